//! The one walk every program makes: from the cgroup v2 root down to the socket's own cgroup,
//! through the scopes that have rules, until one of them decides. A fault on a cgroup covers
//! its descendants this way, including cgroups created after it was injected.

use faultd_common::MAX_CGROUP_DEPTH;

/// What a scope's rules say about the packet or connect.
pub enum Step<T> {
    /// This scope decides.
    Found(T),
    /// Nothing here: ask the next scope down.
    Next,
    /// Stop looking: the packet passes (fail open).
    Stop,
}

/// Visits the ancestors of the cgroup `leaf` that `scoped` says have rules, root first, until
/// `visit` decides. `ancestor(level)` is the cgroup id at that depth (the helper of the program
/// type); 0 means there is no such level. Bounded by MAX_CGROUP_DEPTH for the verifier.
#[inline(always)]
pub fn walk<T>(
    leaf: u64,
    ancestor: impl Fn(i32) -> u64,
    scoped: impl Fn(u64) -> bool,
    mut visit: impl FnMut(u64) -> Step<T>,
) -> Option<T> {
    if leaf == 0 {
        return None;
    }
    for level in 0..MAX_CGROUP_DEPTH {
        let scope = ancestor(level as i32);
        if scope == 0 {
            return None;
        }
        if scoped(scope) {
            match visit(scope) {
                Step::Found(found) => return Some(found),
                Step::Stop => return None,
                Step::Next => {}
            }
        }
        if scope == leaf {
            return None;
        }
    }
    None
}
