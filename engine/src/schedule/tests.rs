use std::collections::HashMap;

use super::*;

fn act(token: &str) -> Action {
    token.parse().unwrap_or_else(|e| panic!("test token {token}: {e}"))
}

fn list(tokens: &str) -> Vec<Action> {
    tokens.split_whitespace().map(act).collect()
}

fn lists(rows: &[&str]) -> Vec<Vec<Action>> {
    rows.iter().map(|r| list(r)).collect()
}

fn sizes() -> Vec<(usize, usize)> {
    (1..=4).flat_map(|p| [(p, 1), (p, p), (p, 2 * p + 1)]).collect()
}

/// A hand-written zero-bubble-style schedule for 2 stages: backwards split into I and W, with
/// the W's deferred to fill the time 1F1B spends idle.
fn zero_bubble_2x3() -> Result<Schedule, ScheduleError> {
    Schedule::from_actions(
        "zb-h1",
        2,
        3,
        lists(&["0F0 0F1 0I0 0F2 0I1 0W0 0I2 0W1 0W2", "1F0 1I0 1F1 1I1 1F2 1I2 1W0 1W1 1W2"]),
    )
}

// ---- actions ----

#[test]
fn action_prints_and_parses_pytorch_tokens() {
    let cases = [
        ("1F3", Action::forward(1, 3)),
        ("0B0", Action::backward(0, 0)),
        ("2I7", Action::backward_input(2, 7)),
        ("12W345", Action::backward_weight(12, 345)),
    ];
    for (token, action) in cases {
        assert_eq!(action.to_string(), token);
        assert_eq!(token.parse::<Action>().unwrap(), action);
    }
    assert_eq!(format!("{:>5}|", Action::forward(1, 3)), "  1F3|");
}

#[test]
fn action_parse_errors_name_the_token() {
    for bad in [
        "",
        "F3",
        "1F",
        "1X3",
        "1F3x",
        "1f3",
        "abc",
        "1F-3",
        "99999999999999999999999F1",
        "0F18446744073709551615",
        "0.67108864F1",
    ] {
        match bad.parse::<Action>() {
            Err(ScheduleError::BadAction { token, .. }) => assert_eq!(token, bad),
            other => panic!("{bad:?} parsed as {other:?}"),
        }
        let message = bad.parse::<Action>().unwrap_err().to_string();
        assert!(message.contains(&format!("`{bad}`")), "{message}");
    }
}

// ---- kinds and constructors ----

#[test]
fn absurd_counts_are_refused_before_building() {
    // Typos of a few zeros: refused at once, neither overflowing nor exhausting memory.
    for (p, m, v) in [(2, 1 << 40, 1), (1 << 40, 2, 1), (4, usize::MAX, 2)] {
        let kind = if v == 1 { ScheduleKind::OneFOneB } else { ScheduleKind::Interleaved };
        let e = kind.build_with(p, m, v).unwrap_err().to_string();
        assert!(e.contains("actions a schedule may hold"), "{e}");
    }
    ScheduleKind::GPipe.build(2, 1000).unwrap();
}

#[test]
fn schedule_kind_names() {
    for (text, kind) in [
        ("gpipe", ScheduleKind::GPipe),
        ("GPipe", ScheduleKind::GPipe),
        ("1f1b", ScheduleKind::OneFOneB),
        ("1F1B", ScheduleKind::OneFOneB),
        ("One-F-One-B", ScheduleKind::OneFOneB),
    ] {
        assert_eq!(text.parse::<ScheduleKind>().unwrap(), kind);
        assert_eq!(kind.to_string().parse::<ScheduleKind>().unwrap(), kind);
    }
    assert!(matches!("zero-bubble".parse::<ScheduleKind>(), Err(ScheduleError::UnknownKind(s)) if s == "zero-bubble"));
    assert_eq!(ScheduleKind::GPipe.build(3, 5).unwrap(), Schedule::gpipe(3, 5).unwrap());
    assert_eq!(ScheduleKind::OneFOneB.build(3, 5).unwrap(), Schedule::one_f_one_b(3, 5).unwrap());
    assert_eq!(Schedule::one_f_one_b(3, 5).unwrap().name(), "1f1b");
}

#[test]
fn zero_stages_or_microbatches_is_an_error() {
    let empty = |r: Result<Schedule, ScheduleError>| matches!(r, Err(ScheduleError::Empty { .. }));
    assert!(empty(Schedule::gpipe(0, 4)));
    assert!(empty(Schedule::gpipe(4, 0)));
    assert!(empty(Schedule::one_f_one_b(0, 4)));
    assert!(empty(Schedule::one_f_one_b(4, 0)));
    assert!(empty(Schedule::forward_only(0, 1)));
    assert!(empty(ScheduleKind::OneFOneB.build(2, 0)));
    assert!(empty(Schedule::from_actions("x", 0, 0, vec![])));
}

/// Every (stage, micro-batch) has exactly one F and one B, each on its own stage's list.
fn assert_complete_training(schedule: &Schedule) {
    let (p, m) = (schedule.stages(), schedule.microbatches());
    let mut counts: HashMap<Action, usize> = HashMap::new();
    for s in 0..p {
        for a in schedule.stage_actions(s) {
            assert_eq!(a.stage, s, "{a} on stage {s}");
            *counts.entry(*a).or_default() += 1;
        }
    }
    for s in 0..p {
        for mb in 0..m {
            assert_eq!(counts.get(&Action::forward(s, mb)), Some(&1), "{p}x{m}: {s}F{mb}");
            assert_eq!(counts.get(&Action::backward(s, mb)), Some(&1), "{p}x{m}: {s}B{mb}");
        }
    }
    assert_eq!(counts.len(), 2 * p * m, "{p}x{m}: unexpected extra actions");
    assert!(schedule.is_training());
    schedule.validate().unwrap();
}

#[test]
fn gpipe_runs_all_forwards_then_all_backwards() {
    for (p, m) in sizes() {
        let schedule = Schedule::gpipe(p, m).unwrap();
        assert_eq!((schedule.stages(), schedule.microbatches()), (p, m));
        assert_complete_training(&schedule);
        for s in 0..p {
            let expected: Vec<Action> =
                (0..m).map(|mb| Action::forward(s, mb)).chain((0..m).map(|mb| Action::backward(s, mb))).collect();
            assert_eq!(schedule.stage_actions(s), expected.as_slice());
        }
    }
}

/// Micro-batches forwarded but not yet backwarded, at the worst moment of stage `s`'s list.
fn max_in_flight(actions: &[Action]) -> usize {
    let mut live = 0i64;
    let mut max = 0i64;
    for a in actions {
        live += match a.kind {
            ActionKind::Forward => 1,
            _ => -1,
        };
        max = max.max(live);
    }
    max as usize
}

#[test]
fn one_f_one_b_holds_at_most_p_minus_s_microbatches() {
    for (p, m) in sizes() {
        let schedule = Schedule::one_f_one_b(p, m).unwrap();
        assert_complete_training(&schedule);
        for s in 0..p {
            let actions = schedule.stage_actions(s);
            // The bound is tight: fewer would mean the warm-up is too short to fill the pipe.
            assert_eq!(max_in_flight(actions), (p - s).min(m), "{p}x{m} stage {s}");
            // Steady state alternates: after the warm-up, never two forwards in a row.
            let warmup = (p - s - 1).min(m);
            assert!(actions[..warmup].iter().all(|a| a.kind == ActionKind::Forward));
            for pair in actions[warmup..].windows(2) {
                assert!(
                    !(pair[0].kind == ActionKind::Forward && pair[1].kind == ActionKind::Forward),
                    "{p}x{m} stage {s}"
                );
            }
        }
    }
}

#[test]
fn one_f_one_b_lists_match_megatron_for_4x8() {
    let schedule = Schedule::one_f_one_b(4, 8).unwrap();
    assert_eq!(schedule.stage_actions(0), list("0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7"));
    assert_eq!(schedule.stage_actions(3), list("3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7"));
    assert_eq!(schedule.stage_actions(4), &[] as &[Action]);
}

#[test]
fn forward_only_has_one_forward_per_stage_and_microbatch() {
    for (p, m) in sizes() {
        let schedule = Schedule::forward_only(p, m).unwrap();
        assert!(!schedule.is_training());
        for s in 0..p {
            let expected: Vec<Action> = (0..m).map(|mb| Action::forward(s, mb)).collect();
            assert_eq!(schedule.stage_actions(s), expected.as_slice());
        }
        assert_eq!(schedule.timeline(ActionCosts::default()).makespan(), (m + p - 1) as f64);
    }
}

#[test]
fn split_backward_schedule_validates_and_beats_1f1b() {
    let zb = zero_bubble_2x3().unwrap();
    assert!(zb.is_training());
    let costs = ActionCosts::default();
    let zb_time = zb.timeline(costs);
    let one_f_one_b_time = Schedule::one_f_one_b(2, 3).unwrap().timeline(costs);
    assert_eq!(one_f_one_b_time.makespan(), 12.0);
    assert_eq!(zb_time.makespan(), 10.0);
    assert_eq!(zb_time.busy_times(), vec![9.0, 9.0]);
    assert!((zb_time.bubble_fraction() - 0.1).abs() < 1e-12);
}

// ---- timeline ----

#[test]
fn bubble_matches_closed_form_for_gpipe_and_1f1b() {
    for p in 1..=5 {
        for m in 1..=9 {
            for schedule in [Schedule::gpipe(p, m).unwrap(), Schedule::one_f_one_b(p, m).unwrap()] {
                let timeline = schedule.timeline(ActionCosts::default());
                let expected = (p as f64 - 1.0) / ((m + p) as f64 - 1.0);
                assert_eq!(schedule.theoretical_bubble(), expected);
                assert!((timeline.bubble_fraction() - expected).abs() < 1e-12, "{} {p}x{m}", schedule.name());
                assert_eq!(timeline.makespan(), 3.0 * (m + p - 1) as f64, "{} {p}x{m}", schedule.name());
                assert_eq!(timeline.busy_times(), vec![3.0 * m as f64; p]);
            }
        }
    }
}

#[test]
fn timeline_uses_the_given_costs() {
    // B costs I + W = 2.5. Stage 1: F0 1-2, F1 2-3, B0 3-5.5, B1 5.5-8; stage 0 follows each
    // of stage 1's backwards: B0 5.5-8, B1 8-10.5.
    let costs = ActionCosts { forward: 1.0, backward_input: 2.0, backward_weight: 0.5 };
    let timeline = Schedule::gpipe(2, 2).unwrap().timeline(costs);
    let spans =
        |s| timeline.stage_entries(s).iter().map(|t| (t.action.to_string(), t.start, t.end)).collect::<Vec<_>>();
    let span = |t: &str, a: f64, b: f64| (t.to_string(), a, b);
    assert_eq!(
        spans(0),
        vec![span("0F0", 0.0, 1.0), span("0F1", 1.0, 2.0), span("0B0", 5.5, 8.0), span("0B1", 8.0, 10.5)]
    );
    assert_eq!(
        spans(1),
        vec![span("1F0", 1.0, 2.0), span("1F1", 2.0, 3.0), span("1B0", 3.0, 5.5), span("1B1", 5.5, 8.0)]
    );
    assert_eq!(timeline.makespan(), 10.5);
    assert_eq!(timeline.idle_time(), 7.0);
    assert!((timeline.bubble_fraction() - 1.0 / 3.0).abs() < 1e-12);
    assert!(timeline.stage_entries(2).is_empty());
}

/// Per-stage costs with message delays, whose stages may slow each other by `slowdown(k)`
/// while `k` compute at once; `forced` runs the shared-time simulation even at no slowdown.
struct Contended {
    forward: Vec<f64>,
    backward_input: Vec<f64>,
    backward_weight: Vec<f64>,
    hop: f64,
    slowdown: fn(usize) -> f64,
    forced: bool,
}

impl CostModel for Contended {
    fn duration(&self, a: Action) -> f64 {
        let c = a.chunk % self.forward.len();
        match a.kind {
            ActionKind::Forward => self.forward[c],
            ActionKind::Backward => self.backward_input[c] + self.backward_weight[c],
            ActionKind::BackwardInput => self.backward_input[c],
            ActionKind::BackwardWeight => self.backward_weight[c],
        }
    }

    fn transfer(&self, _: Action) -> f64 {
        self.hop
    }

    fn slowdown(&self, running: usize) -> f64 {
        (self.slowdown)(running)
    }

    fn contended(&self, stages: usize) -> bool {
        self.forced || (1..=stages).any(|k| self.slowdown(k) != 1.0)
    }
}

#[test]
fn the_shared_time_simulation_without_slowdown_is_the_plain_one() {
    // Uneven stages, a hop, a zero-cost W: every schedule kind, every size, the same spans.
    let costs = |forced| Contended {
        forward: vec![1.0, 1.5, 0.7, 1.2],
        backward_input: vec![1.3, 2.1, 1.1, 0.9],
        backward_weight: vec![0.6, 0.0, 0.8, 0.4],
        hop: 0.05,
        slowdown: |_| 1.0,
        forced,
    };
    let mut compared = 0;
    for kind in ScheduleKind::ALL {
        for (p, m) in sizes() {
            let Ok(schedule) = kind.build(p, m) else { continue };
            let (plain, shared) = (schedule.timeline_with(&costs(false)), schedule.timeline_with(&costs(true)));
            for s in 0..p {
                let (a, b) = (plain.stage_entries(s), shared.stage_entries(s));
                assert_eq!(a.len(), b.len(), "{kind} {p}x{m} stage {s}");
                for (x, y) in a.iter().zip(b) {
                    assert_eq!(x.action, y.action, "{kind} {p}x{m}");
                    assert!(
                        (x.start - y.start).abs() < 1e-9 && (x.end - y.end).abs() < 1e-9,
                        "{kind} {p}x{m}: {x:?} {y:?}"
                    );
                }
            }
            compared += 1;
        }
    }
    assert!(compared > 30, "{compared}");
}

#[test]
fn stages_computing_at_once_share_the_slowdown() {
    // GPipe 2 x 2, F = 1, B = 2, two stages at once run 1.5x slower. Stage 0: F0 alone 0-1;
    // F1 with stage 1's F0, 1-2.5; stage 1's F1 alone 2.5-3.5 and B0 3.5-5.5; then stage 0's
    // B0 with stage 1's B1, 5.5-8.5; stage 0's B1 alone 8.5-10.5.
    let costs = Contended {
        forward: vec![1.0, 1.0],
        backward_input: vec![2.0, 2.0],
        backward_weight: vec![0.0, 0.0],
        hop: 0.0,
        slowdown: |k| if k >= 2 { 1.5 } else { 1.0 },
        forced: false,
    };
    let timeline = Schedule::gpipe(2, 2).unwrap().timeline_with(&costs);
    let spans =
        |s| timeline.stage_entries(s).iter().map(|t| (t.action.to_string(), t.start, t.end)).collect::<Vec<_>>();
    let span = |t: &str, a: f64, b: f64| (t.to_string(), a, b);
    assert_eq!(
        spans(0),
        vec![span("0F0", 0.0, 1.0), span("0F1", 1.0, 2.5), span("0B0", 5.5, 8.5), span("0B1", 8.5, 10.5)]
    );
    assert_eq!(
        spans(1),
        vec![span("1F0", 1.0, 2.5), span("1F1", 2.5, 3.5), span("1B0", 3.5, 5.5), span("1B1", 5.5, 8.5)]
    );
    // Without contention it takes 9: the 1 + 2 seconds of work that overlapped cost half again.
    assert_eq!(
        Schedule::gpipe(2, 2)
            .unwrap()
            .timeline(ActionCosts { backward_weight: 0.0, backward_input: 2.0, forward: 1.0 })
            .makespan(),
        9.0
    );
}

// ---- printing and parsing ----

/// Checked by hand: stage s starts F0 at t=s; 3B0 runs 4-6, and each stage's B0 starts when the
/// next stage's B0 ends (2B0 6-8, 1B0 8-10, 0B0 10-12); the last stage then alternates with
/// period 3 (3Fk at 3+3k), so 3B7 ends at 27 and 0B7 at 27 + 3*2 = 33 = 3(m+p-1).
const ONE_F_ONE_B_4X8_GRID: &str = concat!(
    "# brigade schedule: 1f1b stages=4 microbatches=8\n",
    "# one column per time unit (F=1 I=1 W=1 B=2); '.' idle, '-' the action to the left continues\n",
    "time    |   0   1   2   3   4   5   6   7   8   9  10  11  12  13  14  15  16  17  18  19  20  21  22  23  24  25  26  27  28  29  30  31  32\n",
    "stage 0 | 0F0 0F1 0F2 0F3   .   .   .   .   .   . 0B0 --- 0F4 0B1 --- 0F5 0B2 --- 0F6 0B3 --- 0F7 0B4 ---   . 0B5 ---   . 0B6 ---   . 0B7 ---\n",
    "stage 1 |   . 1F0 1F1 1F2   .   .   .   . 1B0 --- 1F3 1B1 --- 1F4 1B2 --- 1F5 1B3 --- 1F6 1B4 --- 1F7 1B5 ---   . 1B6 ---   . 1B7 ---   .   .\n",
    "stage 2 |   .   . 2F0 2F1   .   . 2B0 --- 2F2 2B1 --- 2F3 2B2 --- 2F4 2B3 --- 2F5 2B4 --- 2F6 2B5 --- 2F7 2B6 ---   . 2B7 ---   .   .   .   .\n",
    "stage 3 |   .   .   . 3F0 3B0 --- 3F1 3B1 --- 3F2 3B2 --- 3F3 3B3 --- 3F4 3B4 --- 3F5 3B5 --- 3F6 3B6 --- 3F7 3B7 ---   .   .   .   .   .   .\n",
);

#[test]
fn grid_snapshot_1f1b_4x8() {
    assert_eq!(Schedule::one_f_one_b(4, 8).unwrap().grid(), ONE_F_ONE_B_4X8_GRID);
}

#[test]
fn text_format_snapshot() {
    let expected = concat!(
        "# brigade schedule: 1f1b stages=2 microbatches=2\n",
        "stage 0: 0F0 0F1 0B0 0B1\n",
        "stage 1: 1F0 1B0 1F1 1B1\n",
    );
    let schedule = Schedule::one_f_one_b(2, 2).unwrap();
    assert_eq!(schedule.to_text(), expected);
    assert_eq!(schedule.to_string(), expected);
}

#[test]
fn text_and_grid_round_trip() {
    let mut schedules: Vec<Schedule> = sizes()
        .into_iter()
        .flat_map(|(p, m)| {
            [Schedule::gpipe(p, m), Schedule::one_f_one_b(p, m), Schedule::forward_only(p, m)].map(Result::unwrap)
        })
        .collect();
    schedules.push(Schedule::one_f_one_b(3, 12).unwrap());
    schedules.push(zero_bubble_2x3().unwrap());
    for schedule in schedules {
        assert_eq!(Schedule::parse(&schedule.to_text()).unwrap(), schedule, "{}", schedule.to_text());
        assert_eq!(Schedule::parse(&schedule.grid()).unwrap(), schedule, "{}", schedule.grid());
    }
}

#[test]
fn parse_infers_counts_without_header() {
    let text = "\n  # hand-written\nstage 1: 1F0 1B0 1F1 1B1\nstage 0: 0F0 0F1 0B0 0B1\n";
    let schedule = Schedule::parse(text).unwrap();
    assert_eq!((schedule.stages(), schedule.microbatches(), schedule.name()), (2, 2, "custom"));
    assert_eq!(
        schedule,
        Schedule::from_actions("custom", 2, 2, lists(&["0F0 0F1 0B0 0B1", "1F0 1B0 1F1 1B1"])).unwrap()
    );

    let edited_grid = "stage 0 | 0F0 . 0F1 --- 0B0 0B1\nstage 1 | . 1F0 1B0 -- 1F1 1B1\n";
    assert_eq!(Schedule::parse(edited_grid).unwrap().stage_actions(1), list("1F0 1B0 1F1 1B1"));
}

#[test]
fn parse_rejects_malformed_text() {
    let line_of = |text: &str| match Schedule::parse(text) {
        Err(ScheduleError::Parse { line, reason }) => (line, reason),
        other => panic!("{text:?} gave {other:?}"),
    };
    let (line, reason) = line_of("stage 0: 0F0\nstage 1: 1F0 1Q0\n");
    assert_eq!(line, 2);
    assert!(reason.contains("`1Q0`"), "{reason}");

    let (line, reason) = line_of("# brigade schedule: x stages=3 microbatches=1\nstage 0: 0F0\nstage 1: 1F0\n");
    assert_eq!(line, 1);
    assert!(reason.contains("stages=3"), "{reason}");
    let (_, reason) = line_of("# brigade schedule: x stages=1 microbatches=2\nstage 0: 0F0\n");
    assert!(reason.contains("microbatches=2"), "{reason}");
    let (_, reason) = line_of("# brigade schedule: x stages=two\nstage 0: 0F0\n");
    assert!(reason.contains("stages=two"), "{reason}");

    assert_eq!(line_of("stage 0: 0F0\nstage 0: 0F0\n").0, 2);
    assert_eq!(line_of("hello world\n").0, 1);
    assert_eq!(line_of("stage x: 0F0\n").0, 1);
    assert_eq!(line_of("stage 999999999: 0F0\n").0, 1);
    assert_eq!(Schedule::parse("stage 0: 0F0\n\nstage 2: 2F0\n"), Err(ScheduleError::MissingStageRow(1)));
    assert!(matches!(Schedule::parse("# nothing\n"), Err(ScheduleError::Empty { .. })));
    // Parsed text goes through the validator like any other schedule.
    assert!(matches!(Schedule::parse("stage 0: 0B0 0F0\n"), Err(ScheduleError::OutOfOrder { .. })));
}

#[test]
fn load_reads_files_and_names_missing_ones() {
    let dir = std::env::temp_dir().join(format!("brigade-schedule-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("1f1b.txt");
    let schedule = Schedule::one_f_one_b(3, 4).unwrap();
    std::fs::write(&path, schedule.grid()).unwrap();
    assert_eq!(Schedule::load(&path).unwrap(), schedule);

    std::fs::write(&path, "stage 0: 0F0 zz\n").unwrap();
    match Schedule::load(&path) {
        Err(ScheduleError::InFile { path: p, source }) => {
            assert_eq!(p, path.display().to_string());
            assert!(matches!(*source, ScheduleError::Parse { line: 1, .. }));
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();

    let missing = dir.join("nope.txt");
    let err = Schedule::load(&missing).unwrap_err();
    assert!(matches!(&err, ScheduleError::Io { path, .. } if *path == missing.display().to_string()));
    assert!(err.to_string().contains("nope.txt"));
}

// ---- validator ----

fn rejection(rows: &[&str], microbatches: usize) -> ScheduleError {
    let err = Schedule::from_actions("test", rows.len(), microbatches, lists(rows)).unwrap_err();
    assert!(err.to_string().contains("<-- ERROR HERE"), "{err}");
    err
}

#[test]
fn rejects_missing_backward() {
    let err = rejection(&["0F0 0F1 0B0", "1F0 1F1 1B0 1B1"], 2);
    assert!(matches!(err, ScheduleError::MissingWork { stage: 0, microbatch: 1, more: 0, .. }), "{err:?}");
    assert!(err.to_string().contains("0B1 (or 0I1 and 0W1)"), "{err}");
    // The marker is on stage 0's row.
    let message = err.to_string();
    let marked: Vec<&str> = message.lines().filter(|l| l.contains("<-- ERROR HERE")).collect();
    assert_eq!(marked.len(), 1);
    assert!(marked[0].starts_with("stage 0 |"), "{}", marked[0]);
}

#[test]
fn rejects_missing_forward_in_forward_only_schedule() {
    let err = rejection(&["0F0 0F1", "1F0"], 2);
    assert!(matches!(err, ScheduleError::MissingWork { stage: 1, microbatch: 1, .. }), "{err:?}");
    assert!(err.to_string().contains("missing 1F1"), "{err}");
}

#[test]
fn rejects_half_a_split_backward() {
    let err = rejection(&["0F0 0I0", "1F0 1B0"], 1);
    assert!(err.to_string().contains("missing 0W0"), "{err}");
}

#[test]
fn rejects_full_and_split_backward_together() {
    let err = rejection(&["0F0 0B0 0I0 0W0", "1F0 1B0"], 1);
    assert!(
        matches!(err, ScheduleError::ConflictingBackward { full, split, .. } if full == act("0B0") && split == act("0I0")),
        "{err:?}"
    );
}

#[test]
fn rejects_stages_that_only_forward_in_training() {
    let err = rejection(&["0F0 0B0", "1F0"], 1);
    assert!(matches!(&err, ScheduleError::MixedTraining { stages, .. } if stages == &[1]), "{err:?}");
}

#[test]
fn rejects_backward_before_forward() {
    let err = rejection(&["0F0 0F1 0B0 0B1", "1F0 1B1 1F1 1B0"], 2);
    assert!(
        matches!(err, ScheduleError::OutOfOrder { action, needs, .. } if action == act("1B1") && needs == act("1F1")),
        "{err:?}"
    );
    assert!(err.to_string().contains("[1B1][1F1]"), "{err}");
}

#[test]
fn rejects_weight_grad_before_input_grad() {
    let err = rejection(&["0F0 0W0 0I0", "1F0 1B0"], 1);
    assert!(
        matches!(err, ScheduleError::OutOfOrder { action, needs, .. } if action == act("0W0") && needs == act("0I0")),
        "{err:?}"
    );
}

#[test]
fn rejects_duplicates() {
    let err = rejection(&["0F0 0F0 0B0", "1F0 1B0"], 1);
    assert!(matches!(err, ScheduleError::Duplicate { action, .. } if action == act("0F0")), "{err:?}");
    assert!(err.to_string().contains("[0F0][0F0]"), "{err}");
}

#[test]
fn rejects_action_on_wrong_stage() {
    let err = rejection(&["0F0 0B0 1F0", "1B0"], 1);
    assert!(matches!(err, ScheduleError::WrongStage { action, listed_on: 0, .. } if action == act("1F0")), "{err:?}");
}

#[test]
fn rejects_out_of_range_indices() {
    let err = rejection(&["0F0 0B0", "1F0 1F2 1B0"], 2);
    assert!(matches!(err, ScheduleError::OutOfRange { action, .. } if action == act("1F2")), "{err:?}");
    let err = rejection(&["0F0 0B0 2F0", "1F0 1B0"], 1);
    assert!(matches!(err, ScheduleError::OutOfRange { action, .. } if action == act("2F0")), "{err:?}");
    let err = Schedule::from_actions("x", 3, 1, lists(&["0F0"])).unwrap_err();
    assert_eq!(err, ScheduleError::StageCount { expected: 3, got: 1 });
}

#[test]
fn rejects_deadlock_naming_stuck_actions() {
    // Stage 0 wants 1B0's gradient before forwarding micro-batch 1; stage 1 wants 0F1's
    // activation before backwarding micro-batch 0. Each waits for the other forever.
    let err = rejection(&["0F0 0B0 0F1 0B1", "1F0 1F1 1B0 1B1"], 2);
    let ScheduleError::Deadlock { stuck, grid } = &err else { panic!("{err:?}") };
    assert_eq!(
        stuck,
        &vec![
            Stuck { stage: 0, blocked: act("0B0"), waits_for: vec![act("1B0")] },
            Stuck { stage: 1, blocked: act("1F1"), waits_for: vec![act("0F1")] },
        ]
    );
    let message = err.to_string();
    assert!(message.contains("stage 0 is blocked at 0B0 waiting for 1B0"), "{message}");
    assert!(message.contains("stage 1 is blocked at 1F1 waiting for 0F1"), "{message}");
    assert!(grid.contains("stage 0 | 0F0 [0B0]"), "{grid}");
    assert!(grid.contains("stage 1 | 1F0 [1F1]"), "{grid}");
}

#[test]
fn split_backward_order_and_deadlock_are_caught() {
    // Stage 1 defers its I until after W: W waits for I, which stage 0 also waits for.
    let err = rejection(&["0F0 0F1 0B0 0B1", "1F0 1I0 1F1 1W1 1I1 1W0"], 2);
    // Same-stage order problems are reported as such, not as a deadlock.
    assert!(matches!(err, ScheduleError::OutOfOrder { action, .. } if action == act("1W1")), "{err:?}");

    // A genuine cross-stage cycle with a split backward.
    let err = rejection(&["0F0 0I0 0F1 0I1 0W0 0W1", "1F0 1F1 1I0 1I1 1W0 1W1"], 2);
    let ScheduleError::Deadlock { stuck, .. } = &err else { panic!("{err:?}") };
    assert_eq!(stuck[0], Stuck { stage: 0, blocked: act("0I0"), waits_for: vec![act("1I0")] });
}

// ---- virtual stages and zero-bubble generators ----

#[test]
fn chunked_actions_print_and_parse() {
    let a = Action::on_chunk(0, 3, ActionKind::Forward, 1);
    assert_eq!(a.to_string(), "0.3F1");
    assert_eq!(act("0.3F1"), a);
    assert_eq!(act("1.1W2"), Action::backward_weight(1, 2), "chunk = stage is the short form");
    assert_eq!(Action::on_chunk(1, 1, ActionKind::Forward, 0).to_string(), "1F0");
    for bad in ["0.F1", "0.3", "0.3.1F1", ".3F1"] {
        assert!(bad.parse::<Action>().is_err(), "{bad} parsed");
    }
}

fn unit_bubble(s: &Schedule) -> f64 {
    s.timeline(ActionCosts::default()).bubble_fraction()
}

#[test]
fn every_kind_validates_and_round_trips_through_text_and_grid() {
    for kind in ScheduleKind::ALL {
        for p in 1..=4 {
            for m in [p, 2 * p, 2 * p + 1, 8] {
                let schedule = match kind.build(p, m) {
                    Ok(s) => s,
                    Err(e) => {
                        assert!(kind == ScheduleKind::Interleaved && m % p != 0, "{kind} p={p} m={m}: {e}");
                        assert!(e.to_string().contains("multiple of the stages"), "{e}");
                        continue;
                    }
                };
                assert_eq!(schedule.chunks(), p * kind.default_virtual_stages(), "{kind}");
                assert_eq!(Schedule::parse(&schedule.to_text()).unwrap(), schedule, "{kind} p={p} m={m}");
                assert_eq!(Schedule::parse(&schedule.grid()).unwrap(), schedule, "{kind} p={p} m={m} grid");
            }
        }
    }
}

#[test]
fn bubbles_follow_the_papers_under_unit_costs() {
    for p in 2..=4 {
        for m in [p, 2 * p, 4 * p] {
            let b = |k: ScheduleKind| unit_bubble(&k.build(p, m).unwrap());
            let (ofob, inter, h1, h2, zbv) = (
                b(ScheduleKind::OneFOneB),
                b(ScheduleKind::Interleaved),
                b(ScheduleKind::ZbH1),
                b(ScheduleKind::ZbH2),
                b(ScheduleKind::ZbV),
            );
            eprintln!("p={p} m={m}: 1f1b {ofob:.3} interleaved {inter:.3} zb-h1 {h1:.3} zb-h2 {h2:.3} zb-v {zbv:.3}");
            // The interleaved chunks are half a stage: F = 1/2 in the same units.
            assert!(inter <= ofob + 1e-9, "p={p} m={m}");
            assert!(h1 < ofob, "p={p} m={m}");
            assert!((ofob - ScheduleKind::OneFOneB.theoretical_bubble(p, m, 1)).abs() < 1e-9);
            assert!(
                (inter - ScheduleKind::Interleaved.theoretical_bubble(p, m, 2)).abs() < 1e-9,
                "interleaved p={p} m={m}: {inter}"
            );
            assert!((h1 - ScheduleKind::ZbH1.theoretical_bubble(p, m, 1)).abs() < 1e-9, "zb-h1 p={p} m={m}: {h1}");
            assert!(h2 <= h1 + 1e-9 && zbv <= h1 + 1e-9, "p={p} m={m}");
            // With equal costs ZB-H1 already reaches the ramp's bound, (p-1)F per stage; ZB-V's
            // half-size chunks halve the ramp and reach that bound too.
            assert!((h1 - (p as f64 - 1.0) / (3.0 * m as f64 + p as f64 - 1.0)).abs() < 1e-9, "zb-h1 p={p} m={m}");
            assert!(zbv < h1, "zb-v p={p} m={m}");
            if m >= 2 * p {
                assert!(
                    (zbv - (p as f64 - 1.0) / (6.0 * m as f64 + p as f64 - 1.0)).abs() < 1e-9,
                    "zb-v p={p} m={m}: {zbv}"
                );
            }
        }
    }
}

#[test]
fn zero_bubble_schedules_keep_their_memory_promises() {
    for p in 2..=4 {
        for m in [p, 2 * p + 1, 4 * p] {
            let ofob = Schedule::one_f_one_b(p, m).unwrap();
            let stash_until_w = |s: &Schedule, d: usize| {
                let (mut live, mut peak) = (0usize, 0usize);
                for a in s.stage_actions(d) {
                    match a.kind {
                        ActionKind::Forward => live += 1,
                        ActionKind::Backward | ActionKind::BackwardWeight => live -= 1,
                        ActionKind::BackwardInput => {}
                    }
                    peak = peak.max(live);
                }
                peak
            };
            let h1 = ScheduleKind::ZbH1.build(p, m).unwrap();
            let h2 = ScheduleKind::ZbH2.build(p, m).unwrap();
            let zbv = ScheduleKind::ZbV.build(p, m).unwrap();
            for d in 0..p {
                assert!(stash_until_w(&h1, d) <= ofob.peak_in_flight(0), "zb-h1 p={p} m={m} d={d}");
                assert!(stash_until_w(&h2, d) < 2 * p, "zb-h2 p={p} m={m} d={d}");
                // Chunk stashes are half a stage's: 2p of them is 1F1B's p.
                assert!(stash_until_w(&zbv, d) <= 2 * p, "zb-v p={p} m={m} d={d}");
            }
        }
    }
}

#[test]
fn routing_tables_are_read_off_the_actions() {
    let zbv = ScheduleKind::ZbV.build(3, 6).unwrap();
    assert_eq!(zbv.placement(), &[0, 1, 2, 2, 1, 0]);
    assert_eq!(zbv.chunks_on(0), vec![0, 5]);
    assert_eq!(zbv.virtual_stages(), Some(2));
    let inter = ScheduleKind::Interleaved.build_with(2, 4, 3).unwrap();
    assert_eq!(inter.placement(), &[0, 1, 0, 1, 0, 1]);
    assert!(inter.to_text().starts_with("# brigade schedule: interleaved-1f1b stages=2 microbatches=4 chunks=6"));
    // One chunk on two devices is refused.
    let e = Schedule::from_actions("x", 2, 1, lists(&["0F0 0.2F0 0.2B0 0B0", "1F0 1.2F0 1.2B0 1B0"])).unwrap_err();
    assert!(matches!(e, ScheduleError::ChunkOnTwoStages { chunk: 2, .. }), "{e}");
    // A chunk with no work at all is missing work.
    let e = Schedule::from_actions("x", 2, 1, lists(&["0F0 0.3F0 0.3B0 0B0", "1F0 1B0"])).unwrap_err();
    assert!(e.to_string().contains("missing 0.2F0") || e.to_string().contains("2F0"), "{e}");
    // Errors name the problem.
    let e = ScheduleKind::Interleaved.build_with(2, 3, 2).unwrap_err().to_string();
    assert!(e.contains("multiple of the stages"), "{e}");
    let e = ScheduleKind::Interleaved.build_with(2, 4, 1).unwrap_err().to_string();
    assert!(e.contains("at least 2 virtual stages"), "{e}");
    let e = ScheduleKind::ZbV.build_with(2, 4, 3).unwrap_err().to_string();
    assert!(e.contains("2 chunk(s) per device"), "{e}");
}

#[test]
fn cost_based_zero_bubble_respects_a_memory_limit_and_refuses_an_impossible_one() {
    let mut costs = GreedyCosts::unit(&[0, 1, 2, 3], 2.0);
    costs.backward_input = vec![1.5; 4];
    costs.backward_weight = vec![0.5; 4];
    let s = Schedule::zero_bubble_from_costs("zb-auto", &costs, 4, 8).unwrap();
    for d in 0..4 {
        assert!(s.peak_in_flight(d) <= 2, "d={d}");
    }
    costs.limit = vec![0.5; 4];
    let e = Schedule::zero_bubble_from_costs("zb-auto", &costs, 4, 8).unwrap_err().to_string();
    assert!(e.contains("below one micro-batch"), "{e}");
}
