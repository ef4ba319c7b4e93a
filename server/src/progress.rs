//! Progress of long commands (import, backup, restore, migrate, a mirror's first sync): a bar when stderr is a terminal,
//! a plain line every few seconds otherwise (logs, CI, pipes), and a last line either way.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a plain progress line is printed.
const EVERY: Duration = Duration::from_secs(2);

/// One long job's progress, counted in rows or another unit (with bytes alongside).
pub struct Progress {
    what: String,
    unit: &'static str,
    total: u64,
    bar: Option<indicatif::ProgressBar>,
    last: Instant,
    rows: u64,
    bytes: u64,
}

impl Progress {
    /// Starts reporting `what`, expecting about `total` rows.
    pub fn new(what: &str, total: u64) -> Progress {
        Progress::counting(what, "rows", total)
    }

    /// Starts reporting `what`, expecting about `total` of `unit`.
    pub fn counting(what: &str, unit: &'static str, total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{prefix}} [{{bar:40}}] {{human_pos}}/{{human_len}} {unit}{{msg}} ({{eta}} left)"
                ))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(what.to_string());
            bar
        });
        Progress {
            what: what.to_string(),
            unit,
            total,
            bar,
            last: Instant::now(),
            rows: 0,
            bytes: 0,
        }
    }

    /// `rows` rows and `bytes` bytes are done.
    pub fn update(&mut self, rows: u64, bytes: u64) {
        self.rows = rows;
        self.bytes = bytes;
        match &self.bar {
            Some(bar) => {
                bar.set_position(rows);
                bar.set_message(self.bytes_part());
            }
            None if self.last.elapsed() >= EVERY => {
                self.last = Instant::now();
                eprintln!("{}", self.line());
            }
            None => {}
        }
    }

    fn line(&self) -> String {
        format!(
            "{}: {}/{} {}{}",
            self.what,
            self.rows,
            self.total.max(self.rows),
            self.unit,
            self.bytes_part()
        )
    }

    /// `, 1.2 MiB` when bytes are counted.
    fn bytes_part(&self) -> String {
        if self.bytes == 0 {
            String::new()
        } else {
            format!(", {}", indicatif::HumanBytes(self.bytes))
        }
    }

    /// The job is over: the bar is cleared and one last line printed.
    pub fn finish(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!("{} done", self.line());
    }
}
