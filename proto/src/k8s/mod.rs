//! The Kubernetes object model.
//!
//! - The typed objects themselves are `k8s-openapi`'s (re-exported as
//!   [`api`]): every kind Kubernetes 1.32 defines, with Kubernetes' JSON
//!   field names and JSON schemas. A maintained crate generated from the
//!   Kubernetes OpenAPI document is more faithful than a hand-written copy.
//! - [`registry`]: the kinds Capstan serves and how each is decoded.
//! - [`selector`]: node selector terms, matched as Kubernetes does.
//! - [`fields`]: which fields of a body Kubernetes does not define.
//! - [`network`]: the service range and the fixed addresses in it.
//! - [`protobuf`]: decoding the protobuf bodies kubectl's typed clients send.
//! - [`storage`]: what masters and node agents share about volumes.
//! - [`stored`]: the rkyv envelope objects are stored, watched and sent in.

pub mod fields;
pub mod network;
pub mod protobuf;
pub mod registry;
pub mod selector;
pub mod storage;
pub mod stored;

pub use k8s_openapi as api;
