//! Short chaos runs in the default suite: a leader killed, paused, and cut
//! off from the other masters (nftables; needs root), its clock skewed
//! (libfaketime), compaction storms under slow watchers, a member replaced
//! with the leader killed mid-change, a power cut (every master killed,
//! unsynced writes lost), and node agents killed and cut off
//! while all masters restart, each checked for linearizability, lost
//! acknowledged writes, the watch guarantees and split brain (and the
//! agents' Deployment for the orchestration invariants). Longer runs:
//! `capstan-chaos matrix`.

use std::time::Duration;

use capstan_chaos::run::{run, RunConfig, Scenario};

async fn scenario(scenario: Scenario, seed: u64) -> capstan_chaos::run::Report {
    scenario_for(scenario, seed, 16).await
}

async fn scenario_for(scenario: Scenario, seed: u64, secs: u64) -> capstan_chaos::run::Report {
    let cfg = RunConfig::new(env!("CARGO_BIN_EXE_capstan").into(), scenario, seed, Duration::from_secs(secs));
    let report = run(cfg).await.expect("chaos run");
    println!("{}", serde_json::to_string(&report).unwrap());
    assert!(report.faults >= 1, "faults were injected: {report:?}");
    assert!(report.passed, "{report:?}");
    report
}

// One test, so the two clusters never share the machine's two cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_pause_partition_and_compaction_lose_nothing() {
    let kill = scenario(Scenario::KillLeader, 11).await;
    assert!(kill.terms_observed >= 2, "a killed leader is replaced by an election: {kill:?}");
    scenario(Scenario::PauseLeader, 12).await;
    scenario(Scenario::PartitionLeader, 13).await;
    scenario(Scenario::ClockSkew, 15).await;
    let compaction = scenario(Scenario::Compaction, 14).await;
    assert!(compaction.compacted_to > 0, "the storm compacted: {compaction:?}");
    // Every master killed and its unsynced writes lost (the skipped-fsync
    // negative control is negative_skipped_fsync.rs).
    let cut = scenario(Scenario::PowerCut, 17).await;
    assert!(cut.power_cut_lost.is_some_and(|c| c.bytes > 0), "the cut dropped unsynced data: {cut:?}");
    let replace = scenario(Scenario::MemberReplace, 16).await;
    assert!(replace.terms_observed >= 2, "the leader was killed mid-change: {replace:?}");
    // Two faults: an agent cut off past the node grace (its pods evicted
    // and replaced), then every master killed at once.
    let agents = scenario_for(Scenario::AgentFaults, 1, 24).await;
    let o = agents.orchestration.as_ref().expect("the agents scenario reports its Deployment");
    assert!(o.pods_seen > 6, "evicted pods were replaced: {o:?}");
}
