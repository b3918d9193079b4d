//! How schedules look to people: the loadable text format, the time × stage grid, and the
//! marked step listing inside validation errors.
//!
//! Text format (what `to_text` writes, `parse` and `load` read):
//!
//! ```text
//! # brigade schedule: 1f1b stages=2 microbatches=2
//! stage 0: 0F0 0F1 0B0 0B1
//! stage 1: 1F0 1B0 1F1 1B1
//! ```
//!
//! The grid (what `grid` writes) is also loadable, so a user can edit what `brigade schedule`
//! prints: rows are `stage N | cells`, `.` cells (idle) and `-` cells (the action to the left
//! still running) are skipped, and the `time |` ruler row is ignored.

use std::fmt;
use std::path::Path;

use super::action::Action;
use super::error::ScheduleError;
use super::timeline::ActionCosts;
use super::Schedule;

const HEADER: &str = "brigade schedule:";

impl Schedule {
    /// The loadable text form: a header comment and one `stage N: actions...` line per stage.
    pub fn to_text(&self) -> String {
        let mut out = self.header_line();
        for (s, list) in self.actions.iter().enumerate() {
            let tokens: Vec<String> = list.iter().map(Action::to_string).collect();
            out.push_str(format!("stage {s}: {}", tokens.join(" ")).trim_end());
            out.push('\n');
        }
        out
    }

    /// A time × stage picture of the unit-cost timeline (F = I = W = 1, B = 2): one column per
    /// time unit, each cell the running action, `.` for idle, dashes where the action to the
    /// left is still running. Loadable by [`Schedule::parse`].
    pub fn grid(&self) -> String {
        let timeline = self.timeline(ActionCosts::default());
        // Unit costs make every start and end a whole number.
        let columns = timeline.makespan().round() as usize;
        let width = self
            .actions
            .iter()
            .flatten()
            .map(|a| a.to_string().len())
            .chain([columns.saturating_sub(1).to_string().len()])
            .max()
            .unwrap_or(1);
        let label_width = format!("stage {}", self.stages.saturating_sub(1)).len();
        let continuation = "-".repeat(width);

        let mut out = self.header_line();
        out.push_str("# one column per time unit (F=1 I=1 W=1 B=2); '.' idle, '-' the action to the left continues\n");
        let ruler: String = (0..columns).map(|t| format!(" {t:>width$}")).collect();
        out.push_str(&format!("{:<label_width$} |{ruler}\n", "time"));
        for s in 0..self.stages {
            let mut cells = vec![".".to_string(); columns];
            for timed in timeline.stage_entries(s) {
                let (start, end) = (timed.start.round() as usize, timed.end.round() as usize);
                for (t, cell) in cells.iter_mut().enumerate().take(end).skip(start) {
                    *cell = if t == start { timed.action.to_string() } else { continuation.clone() };
                }
            }
            let row: String = cells.iter().map(|c| format!(" {c:>width$}")).collect();
            out.push_str(&format!("{:<label_width$} |{row}\n", format!("stage {s}")));
        }
        out
    }

    /// `# brigade schedule: NAME stages=P microbatches=M [chunks=C]` (chunks only when there
    /// are virtual stages).
    fn header_line(&self) -> String {
        let chunks = if self.chunks() != self.stages { format!(" chunks={}", self.chunks()) } else { String::new() };
        format!(
            "# {HEADER} {} stages={} microbatches={}{chunks}\n",
            self.name.replace('\n', " "),
            self.stages,
            self.microbatches
        )
    }

    /// Reads the text format or the grid. Without a header, the stage count is the number of
    /// `stage` rows and the micro-batch count is one past the largest micro-batch listed; with
    /// one, both must agree with the header. The result is validated.
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let parse_err = |line: usize, reason: String| ScheduleError::Parse { line, reason };
        let mut header: Option<Header> = None;
        let mut rows: Vec<Option<Vec<Action>>> = Vec::new();
        let mut row_count = 0usize;
        let line_count = text.lines().count();

        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                if let Some(fields) = comment.trim().strip_prefix(HEADER) {
                    if header.is_some() {
                        return Err(parse_err(line_no, "second `# brigade schedule:` header".into()));
                    }
                    header = Some(Header::parse(fields, line_no)?);
                }
                continue;
            }
            let Some(split_at) = line.find([':', '|']) else {
                return Err(parse_err(line_no, format!("expected `stage N: actions...`, got `{line}`")));
            };
            let (label, body) = (line[..split_at].trim(), &line[split_at + 1..]);
            if label == "time" || label == "step" {
                continue; // the grid's ruler row
            }
            let stage = label.strip_prefix("stage").and_then(|n| n.trim().parse::<usize>().ok()).ok_or_else(|| {
                parse_err(line_no, format!("expected `stage N` before `{}`, got `{label}`", &line[split_at..=split_at]))
            })?;
            let actions = body
                .split_whitespace()
                .filter(|cell| !cell.chars().all(|c| c == '.') && !cell.chars().all(|c| c == '-'))
                .map(|token| token.parse::<Action>().map_err(|e| parse_err(line_no, e.to_string())))
                .collect::<Result<Vec<Action>, _>>()?;
            // Rows beyond the line count cannot all be present, so reject before allocating.
            if stage >= line_count {
                return Err(parse_err(
                    line_no,
                    format!("stage {stage}, but {line_count} lines cannot hold rows for stages 0..={stage}"),
                ));
            }
            if rows.len() <= stage {
                rows.resize(stage + 1, None);
            }
            if rows[stage].is_some() {
                return Err(parse_err(line_no, format!("second row for stage {stage}")));
            }
            rows[stage] = Some(actions);
            row_count += 1;
        }

        if let Some(missing) = rows.iter().position(Option::is_none) {
            return Err(ScheduleError::MissingStageRow(missing));
        }
        let actions: Vec<Vec<Action>> = rows.into_iter().flatten().collect();
        let stages = row_count;
        let microbatches = actions.iter().flatten().map(|a| a.microbatch + 1).max().unwrap_or(0);
        let name = match header {
            None => "custom".to_string(),
            Some(h) => {
                if h.stages.is_some_and(|n| n != stages) {
                    let reason =
                        format!("header says stages={} but there are {stages} stage rows", h.stages.unwrap_or(0));
                    return Err(parse_err(h.line, reason));
                }
                if h.microbatches.is_some_and(|n| n != microbatches) {
                    let reason = format!(
                        "header says microbatches={} but the actions use micro-batches 0..{microbatches}",
                        h.microbatches.unwrap_or(0)
                    );
                    return Err(parse_err(h.line, reason));
                }
                let chunks = actions.iter().flatten().map(|a| a.chunk + 1).max().unwrap_or(0);
                if h.chunks.is_some_and(|n| n != chunks) {
                    let reason =
                        format!("header says chunks={} but the actions use chunks 0..{chunks}", h.chunks.unwrap_or(0));
                    return Err(parse_err(h.line, reason));
                }
                h.name
            }
        };
        Schedule::from_actions(name, stages, microbatches, actions)
    }

    /// [`Schedule::parse`] on a file's contents.
    pub fn load(path: impl AsRef<Path>) -> Result<Schedule, ScheduleError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScheduleError::Io { path: path.display().to_string(), reason: e.to_string() })?;
        Schedule::parse(&text)
            .map_err(|e| ScheduleError::InFile { path: path.display().to_string(), source: Box::new(e) })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

struct Header {
    name: String,
    stages: Option<usize>,
    microbatches: Option<usize>,
    chunks: Option<usize>,
    line: usize,
}

impl Header {
    /// `<name words...> stages=N microbatches=M`, fields in any order.
    fn parse(fields: &str, line: usize) -> Result<Header, ScheduleError> {
        let mut header = Header { name: String::new(), stages: None, microbatches: None, chunks: None, line };
        let mut name_words = Vec::new();
        for word in fields.split_whitespace() {
            let slot = match word.split_once('=') {
                Some(("stages", value)) => Some((&mut header.stages, value)),
                Some(("microbatches", value)) => Some((&mut header.microbatches, value)),
                Some(("chunks", value)) => Some((&mut header.chunks, value)),
                _ => None,
            };
            match slot {
                Some((slot, value)) => {
                    let n = value.parse::<usize>().map_err(|_| ScheduleError::Parse {
                        line,
                        reason: format!("header field `{word}` is not a count"),
                    })?;
                    *slot = Some(n);
                }
                None => name_words.push(word),
            }
        }
        header.name = name_words.join(" ");
        Ok(header)
    }
}

/// A highlighted place in an error listing: a cell (stage list, position) or a whole row.
pub(super) struct Mark {
    stage: usize,
    position: Option<usize>,
    note: String,
}

impl Mark {
    pub(super) fn cell(stage: usize, position: usize, note: &str) -> Mark {
        Mark { stage, position: Some(position), note: note.to_string() }
    }

    pub(super) fn row(stage: usize, note: &str) -> Mark {
        Mark { stage, position: None, note: note.to_string() }
    }

    pub(super) fn note(self, note: &str) -> Mark {
        Mark { note: note.to_string(), ..self }
    }
}

/// The stage lists as a step × stage table (step = position in the list, not time: an invalid
/// schedule has no timeline), marked cells in brackets and `<-- ERROR HERE` on marked rows.
pub(super) fn marked_listing(actions: &[Vec<Action>], marks: &[Mark]) -> String {
    let steps = actions.iter().map(Vec::len).max().unwrap_or(0);
    let width = actions
        .iter()
        .flatten()
        .map(|a| a.to_string().len())
        .chain([steps.saturating_sub(1).to_string().len()])
        .max()
        .unwrap_or(1);
    let label_width = format!("stage {}", actions.len().saturating_sub(1)).len();
    let cell = |text: String, marked: bool| {
        let text = if marked { format!("[{text}]") } else { format!(" {text} ") };
        format!("{text:>w$}", w = width + 2)
    };

    let ruler: String = (0..steps).map(|p| cell(p.to_string(), false)).collect();
    let mut out = format!("{:<label_width$} |{}\n", "step", ruler.trim_end());
    for (s, list) in actions.iter().enumerate() {
        let row_marks: Vec<&Mark> = marks.iter().filter(|m| m.stage == s).collect();
        let cells: String = list
            .iter()
            .enumerate()
            .map(|(pos, a)| cell(a.to_string(), row_marks.iter().any(|m| m.position == Some(pos))))
            .collect();
        let mut row = format!("{:<label_width$} |{cells}", format!("stage {s}")).trim_end().to_string();
        if !row_marks.is_empty() {
            let notes: Vec<&str> = row_marks.iter().map(|m| m.note.as_str()).filter(|n| !n.is_empty()).collect();
            row.push_str("   <-- ERROR HERE");
            if !notes.is_empty() {
                row.push_str(": ");
                row.push_str(&notes.join("; "));
            }
        }
        out.push_str(&row);
        out.push('\n');
    }
    out
}
