//! The master's `/debug/failpoints` endpoint, as the chaos harness uses it:
//! with the `failpoints` feature it lists and arms crash points and refuses
//! bad input with 400; without the feature it does not exist (404), so a
//! production build cannot be crashed through it.

use capstan_chaos::cluster::UpCluster;

fn cluster() -> UpCluster {
    UpCluster::start(std::path::Path::new(env!("CARGO_BIN_EXE_capstan")), 1).expect("capstan up")
}

#[cfg(feature = "failpoints")]
#[tokio::test]
async fn arms_lists_and_refuses_bad_input() {
    let c = cluster();
    assert_eq!(c.failpoints_armed(0).await.unwrap(), (200, String::new()), "nothing armed at start");
    // A harmless action: the master stalls 1 ms per snapshot build.
    c.arm_failpoint(0, "raft::snapshot_build", "sleep(1)").await.unwrap();
    let (status, body) = c.failpoints_armed(0).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "raft::snapshot_build=sleep(1)\n"));

    let unknown = c.arm_failpoint(0, "raft::nope", "1*return").await.unwrap_err().to_string();
    assert!(unknown.contains("HTTP 400") && unknown.contains("unknown failpoint"), "{unknown}");
    let bad = c.arm_failpoint(0, "raft::compaction", "explode").await.unwrap_err().to_string();
    assert!(bad.contains("HTTP 400") && bad.contains("unrecognized command"), "{bad}");
    let empty = c.arm_failpoint(0, "raft::compaction", "").await.unwrap_err().to_string();
    assert!(empty.contains("HTTP 400") && empty.contains("empty action"), "{empty}");

    c.arm_failpoint(0, "raft::snapshot_build", "off").await.unwrap();
    let (_, body) = c.failpoints_armed(0).await.unwrap();
    assert_eq!(body, "raft::snapshot_build=off\n");
    // Still the same process: nothing above crashed it.
    let pid = c.endpoints(0).unwrap().pid;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(c.endpoints(0).unwrap().pid, pid);
}

#[cfg(not(feature = "failpoints"))]
#[tokio::test]
async fn absent_without_the_feature() {
    let c = cluster();
    let (status, _) = c.failpoints_armed(0).await.unwrap();
    assert_eq!(status, 404);
    let err = c.arm_failpoint(0, "raft::compaction", "1*return").await.unwrap_err().to_string();
    assert!(err.contains("no /debug/failpoints"), "{err}");
}

/// `capstan build-info` tells the chaos matrix whether it may run the
/// failpoint scenario with this binary.
#[test]
fn build_info_says_whether_crash_points_exist() {
    let capstan = std::path::Path::new(env!("CARGO_BIN_EXE_capstan"));
    assert_eq!(capstan_chaos::run::has_failpoints(capstan), cfg!(feature = "failpoints"));
}
