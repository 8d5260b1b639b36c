//! Deliberate bugs for negative controls (RELIABILITY.md: a checker that
//! never fails proves nothing). Compiled only with the `planted-bugs`
//! feature and armed only by `CAPSTAN_PLANTED_BUG=<name>` at run time; a
//! normal build has none of this code.

/// Is the named bug armed in this process?
pub fn armed(name: &str) -> bool {
    std::env::var("CAPSTAN_PLANTED_BUG").is_ok_and(|v| v.split(',').any(|b| b == name))
}
