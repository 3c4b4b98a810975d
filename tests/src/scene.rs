//! The scene most tests play in: Redis on 6379 in a fresh network namespace, a fresh workload
//! cgroup, a faultd of the test's own, and the workload's view from inside the cgroup.

use std::path::Path;

use crate::{Cgroup, Faultd, FaultdOptions, NetNs, Redis, Workload};

/// Fields drop in this order: the workload view, faultd, Redis, then the cgroup and namespace.
pub struct RedisScene {
    pub inside: Workload,
    pub faultd: Faultd,
    pub redis: Redis,
    pub cgroup: Cgroup,
    pub netns: NetNs,
}

impl RedisScene {
    /// `probe` is the `fd-probe` binary (`fd_probe!()` in the calling test).
    pub async fn start(probe: &Path) -> RedisScene {
        RedisScene::start_with(probe, FaultdOptions::default()).await
    }

    /// With faultd started with `options`.
    pub async fn start_with(probe: &Path, options: FaultdOptions) -> RedisScene {
        let netns = NetNs::new();
        let redis = Redis::start(&netns);
        let cgroup = Cgroup::new();
        let faultd = Faultd::start_with(options).await;
        let inside = Workload::inside(probe, &cgroup, &netns);
        RedisScene {
            inside,
            faultd,
            redis,
            cgroup,
            netns,
        }
    }
}
