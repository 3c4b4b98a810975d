//! A fault whose cgroup is deleted ends with its own reason and event.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::*;
use crate::events::EventKind;

/// Resolves every cgroup scope to `dir`, a real directory standing in for the cgroup.
struct DirResolver(PathBuf);

impl Resolve for DirResolver {
    fn resolve(&self, _scope: &Scope) -> Result<ResolvedScope, ResolveError> {
        let meta = std::fs::metadata(&self.0)
            .map_err(|e| Invalid::new("fault.target.cgroup.path", format!("test dir: {e}")))?;
        Ok(ResolvedScope {
            cgroup_path: "/app".into(),
            cgroup_id: meta.ino(),
            dir: self.0.clone(),
        })
    }
}

#[tokio::test]
async fn a_fault_whose_cgroup_is_deleted_ends_as_target_gone() {
    let dir = std::env::temp_dir().join(format!("faultd-unit-gone-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = FakeDataplane::default();
    let engine = Engine::new(
        Box::new(fake.clone()),
        Box::new(DirResolver(dir.clone())),
        EngineConfig::default(),
    );
    let mut events = engine.subscribe();
    let fault = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(60)),
            drop_spec(100.0, "/app", 6379),
        )
        .unwrap();
    assert!(engine.end_gone_targets().is_empty(), "the cgroup is there");
    assert_eq!(fake.rules().len(), 1);

    std::fs::remove_dir(&dir).unwrap();
    assert_eq!(engine.end_gone_targets(), vec![fault.id.clone()]);
    let ended = engine.get(&fault.id).unwrap();
    assert_eq!(ended.state, FaultState::Reverted);
    let ending = ended.ended.unwrap();
    assert_eq!(ending.reason, RevertReason::TargetGone);
    assert!(ending.detail.contains("was deleted"), "{}", ending.detail);
    assert!(fake.rules().is_empty(), "its kernel entries are gone");
    assert!(engine.leases().is_empty(), "its private lease went with it");

    let mut reverted = None;
    while let Ok(event) = events.try_recv() {
        if let EventKind::Reverted { reason, .. } = &event.kind {
            reverted = Some(*reason);
        }
    }
    assert_eq!(reverted, Some(RevertReason::TargetGone));
}
