//! What a job can observe of the world: in deterministic mode, the same for
//! every run of the same task and nothing of the host; otherwise real time.

use tidepool_host::SandboxConfig;
use tidepool_tests::*;

fn observe(config: SandboxConfig, task: &str) -> serde_json::Value {
    let sb = sandbox(config);
    let job = sb.load(&guest("env-probe")).expect("load");
    let out = run(&sb, &job, task, b"").expect("run");
    serde_json::from_slice(&out.result.expect("ok")).expect("json")
}

#[test]
fn deterministic_tasks_see_virtual_time_seeded_random_and_no_host() {
    let a = observe(test_config(), "task-1");
    let b = observe(test_config(), "task-1");
    let c = observe(test_config(), "task-2");
    assert_eq!(a, b, "same task, same observations");
    assert_ne!(a["hash"], c["hash"], "randomness is seeded by the task id");
    assert!(
        a["wall_ns"].as_u64().expect("wall") < 1_000_000_000,
        "virtual wall clock starts at the epoch: {a}"
    );
    assert_eq!(a["env"], 0);
    assert_eq!(a["args"], 0);
    assert_ne!(a["fs"], "readable", "no filesystem: {a}");
    assert_eq!(a["task"], "task-1");
}

#[test]
fn non_deterministic_mode_sees_real_time() {
    let a = observe(
        SandboxConfig {
            deterministic: false,
            ..test_config()
        },
        "t",
    );
    // 2020-01-01 in ns: a real clock is past it, a virtual one is not.
    assert!(
        a["wall_ns"].as_u64().expect("wall") > 1_577_836_800_000_000_000,
        "{a}"
    );
}
