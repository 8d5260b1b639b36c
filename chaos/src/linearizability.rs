//! Linearizability of a key-value history, checked per key (P-compositionality:
//! a history is linearizable iff each key's sub-history is), with the
//! Wing–Gong search plus Lowe's memoisation of (linearized set, state), as
//! porcupine does.
//!
//! Conventions (RELIABILITY.md): a failed write may or may not have taken
//! effect, so it gets return time +∞ (it may be linearized anywhere after its
//! call, including after everything, i.e. never observed); a failed read is
//! dropped before checking.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::history::{Input, Op, Output};

/// State of one key: its value, absent = None.
pub type State = Option<String>;

/// The sequential model of one key. Returns the state after `input` if the
/// observed `output` is possible from `state`.
pub fn step(state: &State, input: &Input, output: &Output) -> Option<State> {
    match (input, output) {
        (Input::Get, Output::Value(v)) => (v == state).then(|| state.clone()),
        (Input::Put(v), Output::Ok | Output::Unknown) => Some(Some(v.clone())),
        (Input::Delete, Output::Ok | Output::Unknown) => Some(None),
        (Input::Cas { expect, new }, Output::Cas(swapped)) => {
            let hit = state.as_ref() == Some(expect);
            match (hit, swapped) {
                (true, true) => Some(Some(new.clone())),
                (false, false) => Some(state.clone()),
                _ => None,
            }
        }
        // Anything else (including an unexpanded indeterminate CAS) is impossible.
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Ok,
    Illegal { key: String },
}

/// Checks a whole history, key by key.
pub fn check(ops: &[Op]) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in ops {
        if op.output == Output::Failed && op.input == Input::Get {
            continue; // a failed read observed nothing
        }
        by_key.entry(op.key.as_str()).or_default().push(op.clone());
    }
    for (key, ops) in by_key {
        if !check_key(&ops) {
            return Verdict::Illegal { key: key.to_string() };
        }
    }
    Verdict::Ok
}

/// An operation prepared for the search: indeterminate outcomes resolved
/// into the alternatives the model understands.
#[derive(Clone, Debug)]
struct Prepared {
    call: u64,
    ret: u64,
    input: Input,
    outputs: Vec<Output>,
}

fn prepare(op: &Op) -> Prepared {
    let (ret, outputs) = match (&op.input, &op.output) {
        (Input::Cas { .. }, Output::Failed | Output::Unknown) => {
            (u64::MAX, vec![Output::Cas(true), Output::Cas(false)])
        }
        (_, Output::Failed | Output::Unknown) => (u64::MAX, vec![Output::Unknown]),
        (_, o) => (op.ret, vec![o.clone()]),
    };
    Prepared { call: op.call, ret, input: op.input.clone(), outputs }
}

/// Wing–Gong search over one key's operations.
pub fn check_key(ops: &[Op]) -> bool {
    let ops: Vec<Prepared> = ops.iter().map(prepare).collect();
    let n = ops.len();
    if n == 0 {
        return true;
    }
    // Events: (time, is_return, op). Calls sort before returns at equal times,
    // so touching operations count as concurrent (the permissive choice).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, false, i));
        events.push((op.ret, true, i));
    }
    events.sort();
    let mut ret_of = vec![0usize; n];
    for (e, &(_, is_ret, op)) in events.iter().enumerate() {
        if is_ret {
            ret_of[op] = e;
        }
    }
    let mut list = List::new(events.len());
    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    // (call event, output choice taken, state before it)
    let mut stack: Vec<(usize, usize, State)> = Vec::new();
    let mut state: State = None;
    let mut entry = list.head;
    let mut choice_from = 0usize;
    while list.head < list.end {
        let at_return = entry >= list.end || events[entry].1;
        if at_return {
            // A return whose operation is not linearized yet (or the end):
            // everything still pending had to come before it; backtrack.
            let Some((e, c, s)) = stack.pop() else { return false };
            let op = events[e].2;
            linearized[op / 64] &= !(1 << (op % 64));
            // Undo in reverse order of unlinking.
            list.relink(ret_of[op]);
            list.relink(e);
            state = s;
            entry = e;
            choice_from = c + 1;
            continue;
        }
        let op = events[entry].2;
        let mut advanced = false;
        for c in choice_from..ops[op].outputs.len() {
            let Some(new_state) = step(&state, &ops[op].input, &ops[op].outputs[c]) else { continue };
            let mut lin = linearized.clone();
            lin[op / 64] |= 1 << (op % 64);
            if cache.insert((lin.clone(), new_state.clone())) {
                stack.push((entry, c, state));
                state = new_state;
                linearized = lin;
                list.unlink(entry);
                list.unlink(ret_of[op]);
                entry = list.head;
                advanced = true;
                break;
            }
        }
        choice_from = 0;
        if !advanced {
            entry = list.next[entry];
        }
    }
    true
}

/// Doubly linked list over event indexes; `end` is the sentinel past the last.
struct List {
    next: Vec<usize>,
    prev: Vec<usize>,
    head: usize,
    end: usize,
}

impl List {
    fn new(n: usize) -> List {
        List { next: (1..=n).collect(), prev: (0..n).map(|i| i.wrapping_sub(1)).collect(), head: 0, end: n }
    }

    fn unlink(&mut self, e: usize) {
        let (p, nx) = (self.prev[e], self.next[e]);
        if p == usize::MAX {
            self.head = nx;
        } else {
            self.next[p] = nx;
        }
        if nx < self.end {
            self.prev[nx] = p;
        }
    }

    /// Re-inserts `e` where it was; valid when undoing unlinks in reverse order.
    fn relink(&mut self, e: usize) {
        let (p, nx) = (self.prev[e], self.next[e]);
        if p == usize::MAX {
            self.head = e;
        } else {
            self.next[p] = e;
        }
        if nx < self.end {
            self.prev[nx] = e;
        }
    }
}

/// Exhaustive check for small histories: tries every order of the
/// operations that respects real time, dropping indeterminate writes or
/// placing them anywhere after their call. Exponential: tests only.
pub fn check_key_brute(ops: &[Op]) -> bool {
    let ops: Vec<Prepared> = ops.iter().map(prepare).collect();
    let mut used = vec![false; ops.len()];
    fn go(ops: &[Prepared], used: &mut Vec<bool>, state: &State, done: usize) -> bool {
        if done == ops.len() {
            return true;
        }
        for i in 0..ops.len() {
            if used[i] {
                continue;
            }
            // `i` may go next only if no unused operation returned before `i` was called.
            if ops.iter().enumerate().any(|(j, o)| !used[j] && j != i && o.ret < ops[i].call) {
                continue;
            }
            for out in &ops[i].outputs {
                if let Some(s) = step(state, &ops[i].input, out) {
                    used[i] = true;
                    if go(ops, used, &s, done + 1) {
                        return true;
                    }
                    used[i] = false;
                }
            }
        }
        false
    }
    go(&ops, &mut used, &None, 0)
}

#[cfg(test)]
#[path = "linearizability_test.rs"]
mod tests;
