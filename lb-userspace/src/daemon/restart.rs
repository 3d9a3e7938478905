//! A rolling restart as a state machine owned by the state task: each instance of a model in
//! turn is drained, restarted, waited for until ready, and undrained; the next one starts
//! only then, so the model never loses more than one instance of capacity. The state task
//! calls `step` on every tick with what it sees of the current instance and carries out the
//! actions; nothing here touches a process or a map.

use std::time::{Duration, Instant};

use crate::control::BackendState;

/// How long a restarted instance may take to become ready again.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How often the state task steps a running restart.
pub const TICK: Duration = Duration::from_millis(100);

/// What the state task sees of the instance being restarted.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub live_flows: usize,
    pub healthy: bool,
    pub pid: Option<u32>,
    pub state: BackendState,
    pub last_error: Option<String>,
}

/// What the state task is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Drain(String),
    /// Stop the instance's process and start it again.
    Restart(String),
    Undrain(String),
    /// The restart is over: the message for the operator, or why it stopped.
    Finish(Result<String, String>),
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Waiting for its live flows to end (zero twice in a row, a tick apart: a SYN NATed
    /// just before the table changed has landed).
    Draining { deadline: Instant, zeros: u32 },
    /// Waiting for a new process (not `old_pid`) to pass its probes.
    Restarting {
        old_pid: Option<u32>,
        deadline: Instant,
    },
}

#[derive(Debug)]
pub struct RollingRestart {
    pub model: String,
    instances: Vec<String>,
    /// Index of the instance being restarted.
    current: usize,
    phase: Phase,
    drain_timeout: Duration,
    /// An instance gone by its turn is skipped (a reload's replacements: a later reload may
    /// remove one), instead of ending the restart.
    skip_gone: bool,
    started: Instant,
}

impl RollingRestart {
    /// Starts with the first of `instances` (sorted); `Err` if there is none. The action
    /// is the first drain.
    pub fn start(
        model: &str,
        mut instances: Vec<String>,
        drain_timeout: Duration,
        skip_gone: bool,
        now: Instant,
    ) -> Result<(Self, Action), String> {
        if instances.is_empty() {
            return Err(format!("no model named {model:?}"));
        }
        instances.sort();
        let first = instances[0].clone();
        let restart = Self {
            model: model.to_owned(),
            instances,
            current: 0,
            phase: Phase::Draining {
                deadline: now + drain_timeout,
                zeros: 0,
            },
            drain_timeout,
            skip_gone,
            started: now,
        };
        Ok((restart, Action::Drain(first)))
    }

    /// Takes on more instances after those it has (a reload during a rolling restart).
    pub fn extend(&mut self, more: Vec<String>) {
        for name in more {
            if !self.instances[self.current + 1..].contains(&name) {
                self.instances.push(name);
            }
        }
    }

    /// Drops `name` from those still waiting for their turn (a reload reverted its change);
    /// the instance in its turn carries on.
    pub fn forget(&mut self, name: &str) {
        let current = self.current;
        let mut i = 0;
        self.instances.retain(|n| {
            let keep = i <= current || n != name;
            i += 1;
            keep
        });
    }

    /// Whether `name` is still to be restarted (not begun, or being drained).
    pub fn will_restart(&self, name: &str) -> bool {
        let pending = |i: usize| self.instances.get(i).is_some_and(|n| n == name);
        matches!(self.phase, Phase::Draining { .. }) && pending(self.current)
            || (self.current + 1..self.instances.len()).any(pending)
    }

    /// The instance being restarted.
    pub fn instance(&self) -> &str {
        &self.instances[self.current]
    }

    /// One tick: `view` is the current instance now (`None`: it is gone). Returns the
    /// actions to carry out, in order; after `Finish` the restart is over.
    pub fn step(&mut self, view: Option<&View>, now: Instant) -> Vec<Action> {
        let name = self.instance().to_owned();
        let Some(view) = view else {
            if self.skip_gone {
                // Nothing of it is left to undrain: on to the next.
                let mut actions = self.next(name, now);
                actions.remove(0);
                return actions;
            }
            return vec![Action::Finish(Err(format!("instance {name} is gone")))];
        };
        match &mut self.phase {
            Phase::Draining { deadline, zeros } => {
                *zeros = if view.live_flows == 0 { *zeros + 1 } else { 0 };
                if *zeros < 2 && now < *deadline {
                    return Vec::new();
                }
                self.phase = Phase::Restarting {
                    old_pid: view.pid,
                    deadline: now + READY_TIMEOUT,
                };
                vec![Action::Restart(name)]
            }
            Phase::Restarting { old_pid, deadline } => {
                if view.healthy && view.pid.is_some() && view.pid != *old_pid {
                    return self.next(name, now);
                }
                if view.state == BackendState::CrashLooping || now >= *deadline {
                    let why = view
                        .last_error
                        .clone()
                        .unwrap_or_else(|| view.state.to_string());
                    return vec![Action::Finish(Err(format!(
                        "{name} did not become ready again ({why}); left drained, later \
                         instances untouched"
                    )))];
                }
                Vec::new()
            }
        }
    }

    /// Whether the drain of the current instance ran out of time (the restart goes ahead).
    pub fn drain_timed_out(&self, view: &View, now: Instant) -> bool {
        matches!(self.phase, Phase::Draining { deadline, .. } if now >= deadline && view.live_flows > 0)
    }

    /// The current instance is back: undrain it and drain the next, or finish.
    fn next(&mut self, name: String, now: Instant) -> Vec<Action> {
        let mut actions = vec![Action::Undrain(name)];
        self.current += 1;
        match self.instances.get(self.current) {
            Some(next) => {
                self.phase = Phase::Draining {
                    deadline: now + self.drain_timeout,
                    zeros: 0,
                };
                actions.push(Action::Drain(next.clone()));
            }
            None => actions.push(Action::Finish(Ok(format!(
                "restarted {} instances of {} in {:.1}s",
                self.instances.len(),
                self.model,
                now.duration_since(self.started).as_secs_f64()
            )))),
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(live: usize, healthy: bool, pid: u32) -> View {
        View {
            live_flows: live,
            healthy,
            pid: Some(pid),
            state: if healthy {
                BackendState::Draining
            } else {
                BackendState::Starting
            },
            last_error: None,
        }
    }

    const DRAIN: Duration = Duration::from_secs(2);

    #[test]
    fn each_instance_is_drained_restarted_and_undrained_in_turn() {
        let t0 = Instant::now();
        let tick = |n: u32| t0 + TICK * n;
        let (mut r, first) =
            RollingRestart::start("m", vec!["m-1".into(), "m-0".into()], DRAIN, false, t0)
                .expect("instances");
        assert_eq!(first, Action::Drain("m-0".into()), "in name order");
        // Live flows hold the drain; zero twice in a row ends it.
        assert!(r.step(Some(&view(2, true, 10)), tick(1)).is_empty());
        assert!(r.step(Some(&view(0, true, 10)), tick(2)).is_empty());
        assert_eq!(
            r.step(Some(&view(0, true, 10)), tick(3)),
            vec![Action::Restart("m-0".into())]
        );
        // The old process still answering, or a new one not yet ready, is not "back".
        assert!(r.step(Some(&view(0, true, 10)), tick(4)).is_empty());
        assert!(r.step(Some(&view(0, false, 11)), tick(5)).is_empty());
        assert_eq!(
            r.step(Some(&view(0, true, 11)), tick(6)),
            vec![Action::Undrain("m-0".into()), Action::Drain("m-1".into())]
        );
        assert!(r.step(Some(&view(0, true, 20)), tick(7)).is_empty());
        assert_eq!(
            r.step(Some(&view(0, true, 20)), tick(8)),
            vec![Action::Restart("m-1".into())]
        );
        let done = r.step(Some(&view(0, true, 21)), tick(9));
        assert_eq!(done[0], Action::Undrain("m-1".into()));
        assert!(
            matches!(&done[1], Action::Finish(Ok(m)) if m.starts_with("restarted 2 instances of m in ")),
            "{done:?}"
        );
    }

    #[test]
    fn a_drain_that_times_out_restarts_anyway() {
        let t0 = Instant::now();
        let (mut r, _) =
            RollingRestart::start("m", vec!["m-0".into()], DRAIN, false, t0).expect("start");
        let busy = view(3, true, 1);
        assert!(r.step(Some(&busy), t0 + TICK).is_empty());
        assert!(!r.drain_timed_out(&busy, t0 + TICK));
        assert!(r.drain_timed_out(&busy, t0 + DRAIN));
        assert_eq!(
            r.step(Some(&busy), t0 + DRAIN),
            vec![Action::Restart("m-0".into())]
        );
    }

    #[test]
    fn a_crash_loop_or_a_vanished_instance_stops_the_restart() {
        let t0 = Instant::now();
        let (mut r, _) =
            RollingRestart::start("m", vec!["m-0".into(), "m-1".into()], DRAIN, false, t0)
                .expect("start");
        r.step(Some(&view(0, true, 1)), t0 + TICK);
        r.step(Some(&view(0, true, 1)), t0 + TICK * 2);
        let looping = View {
            state: BackendState::CrashLooping,
            last_error: Some("exit status 1".into()),
            ..view(0, false, 2)
        };
        let out = r.step(Some(&looping), t0 + TICK * 3);
        assert!(
            matches!(&out[..], [Action::Finish(Err(e))] if e.contains("m-0 did not become ready again (exit status 1)")),
            "{out:?}"
        );
        let (mut r, _) =
            RollingRestart::start("m", vec!["m-0".into()], DRAIN, false, t0).expect("start");
        assert_eq!(
            r.step(None, t0 + TICK),
            vec![Action::Finish(Err("instance m-0 is gone".into()))]
        );
        assert!(RollingRestart::start("m", Vec::new(), DRAIN, false, t0).is_err());
    }

    #[test]
    fn a_reload_extends_the_running_restart_and_skips_instances_gone_meanwhile() {
        let t0 = Instant::now();
        let (mut r, first) =
            RollingRestart::start("the reload", vec!["a".into(), "b".into()], DRAIN, true, t0)
                .expect("start");
        assert_eq!(first, Action::Drain("a".into()));
        assert!(r.will_restart("a") && r.will_restart("b"));
        r.extend(vec!["b".into(), "c".into(), "d".into()]);
        assert!(r.will_restart("c"));
        r.forget("d");
        r.forget("a");
        assert!(!r.will_restart("d"), "a reverted change is forgotten");
        assert!(r.will_restart("a"), "but not the instance in its turn");
        // a drains and restarts: no longer "to be restarted".
        r.step(Some(&view(0, true, 1)), t0);
        assert_eq!(
            r.step(Some(&view(0, true, 1)), t0),
            vec![Action::Restart("a".into())]
        );
        assert!(!r.will_restart("a"));
        assert_eq!(
            r.step(Some(&view(0, true, 2)), t0),
            vec![Action::Undrain("a".into()), Action::Drain("b".into())]
        );
        // b was removed by a later reload: skipped, on to c (b only once).
        assert_eq!(r.step(None, t0), vec![Action::Drain("c".into())]);
        r.step(Some(&view(0, true, 3)), t0);
        assert_eq!(
            r.step(Some(&view(0, true, 3)), t0),
            vec![Action::Restart("c".into())]
        );
        let done = r.step(Some(&view(0, true, 4)), t0);
        assert_eq!(done[0], Action::Undrain("c".into()));
        assert!(matches!(done[1], Action::Finish(Ok(_))));
    }
}
