//! Known histories, and the fast checker cross-checked against brute force
//! on random small histories (including non-linearizable ones).

use proptest::prelude::*;

use super::*;
use crate::history::{Input, Op, Output};

fn op(call: u64, ret: u64, input: Input, output: Output) -> Op {
    Op { client: 0, key: "k".into(), call, ret, input, output }
}

fn put(v: &str) -> Input {
    Input::Put(v.into())
}

fn val(v: Option<&str>) -> Output {
    Output::Value(v.map(String::from))
}

#[test]
fn sequential_and_concurrent_histories() {
    // put a; get a
    assert!(check_key(&[op(0, 1, put("a"), Output::Ok), op(2, 3, Input::Get, val(Some("a")))]));
    // stale read after a completed write: illegal
    assert!(!check_key(&[
        op(0, 1, put("a"), Output::Ok),
        op(2, 3, put("b"), Output::Ok),
        op(4, 5, Input::Get, val(Some("a"))),
    ]));
    // concurrent write: either value may be read
    assert!(check_key(&[op(0, 10, put("a"), Output::Ok), op(1, 2, Input::Get, val(None))]));
    assert!(check_key(&[op(0, 10, put("a"), Output::Ok), op(1, 2, Input::Get, val(Some("a")))]));
    // two reads that disagree on the order of two writes
    assert!(!check_key(&[
        op(0, 10, put("a"), Output::Ok),
        op(0, 10, put("b"), Output::Ok),
        op(11, 12, Input::Get, val(Some("a"))),
        op(13, 14, Input::Get, val(Some("b"))),
        op(15, 16, Input::Get, val(Some("a"))),
    ]));
    // a read of a value nobody wrote
    assert!(!check_key(&[op(0, 1, Input::Get, val(Some("ghost")))]));
}

#[test]
fn failed_writes_may_or_may_not_happen() {
    // failed put seen later: fine
    assert!(check_key(&[op(0, 1, put("a"), Output::Failed), op(5, 6, Input::Get, val(Some("a")))]));
    // failed put never seen: fine
    assert!(check_key(&[op(0, 1, put("a"), Output::Failed), op(5, 6, Input::Get, val(None))]));
    // but not seen and then unseen (the value cannot come back)
    assert!(!check_key(&[
        op(0, 1, put("a"), Output::Ok),
        op(2, 3, put("b"), Output::Failed),
        op(4, 5, Input::Get, val(Some("b"))),
        op(6, 7, Input::Get, val(Some("a"))),
    ]));
    // an indeterminate CAS that must have swapped
    assert!(check_key(&[
        op(0, 1, put("a"), Output::Ok),
        op(2, 3, Input::Cas { expect: "a".into(), new: "c".into() }, Output::Unknown),
        op(4, 5, Input::Get, val(Some("c"))),
    ]));
}

#[test]
fn keys_are_checked_independently() {
    let mut h = vec![op(0, 1, put("a"), Output::Ok), op(2, 3, Input::Get, val(Some("a")))];
    h.push(Op { key: "other".into(), ..op(0, 1, Input::Get, val(Some("x"))) });
    assert_eq!(check(&h), Verdict::Illegal { key: "other".into() });
    h.pop();
    assert_eq!(check(&h), Verdict::Ok);
}

fn arb_op() -> impl Strategy<Value = Op> {
    let input = prop_oneof![
        3 => Just(Input::Get),
        3 => (0u8..4).prop_map(|v| Input::Put(format!("v{v}"))),
        1 => Just(Input::Delete),
        2 => (0u8..4, 0u8..4).prop_map(|(e, n)| Input::Cas { expect: format!("v{e}"), new: format!("v{n}") }),
    ];
    (0u64..20, 1u64..8, input, 0u8..10, 0u8..5).prop_map(|(call, len, input, o, v)| {
        let output = match (&input, o) {
            (_, 0) => Output::Failed,
            (Input::Get, _) if v == 4 => Output::Value(None),
            (Input::Get, _) => Output::Value(Some(format!("v{v}"))),
            (Input::Cas { .. }, o) => Output::Cas(o % 2 == 0),
            _ => Output::Ok,
        };
        Op { client: 0, key: "k".into(), call, ret: call + len, input, output }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
    #[test]
    fn fast_checker_agrees_with_brute_force(ops in proptest::collection::vec(arb_op(), 1..7)) {
        let ops: Vec<Op> = ops.into_iter().filter(|o| !(o.output == Output::Failed && o.input == Input::Get)).collect();
        prop_assert_eq!(check_key(&ops), check_key_brute(&ops), "{:?}", ops);
    }
}

#[test]
fn random_histories_include_both_verdicts() {
    // The cross-check above only means something if it sees both answers.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut ok, mut bad) = (0, 0);
    for _ in 0..2000 {
        let n = rng.gen_range(2..6);
        let ops: Vec<Op> = (0..n)
            .map(|_| {
                let call = rng.gen_range(0..10);
                let input =
                    if rng.gen_bool(0.5) { Input::Get } else { Input::Put(format!("v{}", rng.gen_range(0..3))) };
                let output = match input {
                    Input::Get => {
                        Output::Value(Some(format!("v{}", rng.gen_range(0..3))).filter(|_| rng.gen_bool(0.8)))
                    }
                    _ => Output::Ok,
                };
                op(call, call + rng.gen_range(1..4), input, output)
            })
            .collect();
        if check_key(&ops) {
            ok += 1
        } else {
            bad += 1
        }
    }
    assert!(ok > 100 && bad > 100, "ok {ok} bad {bad}");
}

#[test]
fn a_long_linearizable_history_checks_quickly() {
    // 2,000 sequential-ish operations from 8 clients on one key.
    let mut ops = Vec::new();
    let mut t = 0;
    let mut current: Option<String> = None;
    for i in 0..2000u64 {
        if i % 3 == 0 {
            let v = format!("v{i}");
            ops.push(op(t, t + 5, Input::Put(v.clone()), Output::Ok));
            current = Some(v);
        } else {
            ops.push(op(t, t + 5, Input::Get, Output::Value(current.clone())));
        }
        t += 6;
    }
    let started = std::time::Instant::now();
    assert!(check_key(&ops));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
