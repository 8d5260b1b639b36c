//! PKI (being written)
