//! Progress on a terminal: one status line per running sync (several with `--jobs`), redrawn
//! in place below the log. Log lines go through [`LogWriter`], which erases the lines first so
//! a log line never starts after a bar; the lines come back on their next tick.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

struct Board {
    /// Each running sync's line, in the order the syncs started.
    lines: BTreeMap<u64, String>,
    /// Lines on the terminal now (the cursor is at the start of the first).
    drawn: usize,
}

static BOARD: Mutex<Board> = Mutex::new(Board {
    lines: BTreeMap::new(),
    drawn: 0,
});
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Erases the lines on the terminal (the cursor is at the start of the first one).
const ERASE: &str = "\r\x1b[J";

fn board() -> std::sync::MutexGuard<'static, Board> {
    BOARD.lock().unwrap_or_else(|p| p.into_inner())
}

/// One sync's status line; erased when dropped.
pub(crate) struct StatusLine(u64);

impl StatusLine {
    pub(crate) fn new() -> StatusLine {
        StatusLine(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// Replaces this sync's line and redraws every line.
    pub(crate) fn set(&self, line: String) {
        let mut b = board();
        b.lines.insert(self.0, line);
        let lines: Vec<&str> = b.lines.values().map(String::as_str).collect();
        let text = render(&lines, terminal_width());
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(text.as_bytes());
        let _ = err.flush();
        b.drawn = lines.len();
    }
}

impl Drop for StatusLine {
    fn drop(&mut self) {
        let mut b = board();
        b.lines.remove(&self.0);
        if b.drawn > 0 {
            // The other syncs' lines come back on their next tick.
            let _ = std::io::stderr().write_all(ERASE.as_bytes());
            b.drawn = 0;
        }
    }
}

/// The bytes that draw `lines` over the ones drawn before, each cut to the terminal's width
/// (a wrapped line would throw the cursor movements off), leaving the cursor at the start of
/// the first line.
fn render(lines: &[&str], width: usize) -> String {
    let mut out = String::from(ERASE);
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.extend(line.chars().take(width.saturating_sub(1).max(1)));
    }
    if lines.len() > 1 {
        out += &format!("\x1b[{}A", lines.len() - 1);
    }
    out.push('\r');
    out
}

/// Columns of the terminal on stderr (80 when it cannot be asked).
fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ writes one winsize into the struct passed; fd 2 may be anything, and
    // the call then fails without touching it.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut size) } == 0;
    match ok && size.ws_col > 0 {
        true => size.ws_col as usize,
        false => 80,
    }
}

/// Writes log lines to stderr, erasing the status lines first when they are shown (they are
/// redrawn on their next tick), so a log line never starts after a bar.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut b = board();
        let mut err = std::io::stderr().lock();
        if b.drawn > 0 {
            err.write_all(ERASE.as_bytes())?;
            b.drawn = 0;
        }
        err.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_drawn_in_place_and_cut_to_the_width() {
        assert_eq!(render(&["a"], 80), "\r\x1b[Ja\r");
        // Three syncs: three lines, then back up two to the first.
        assert_eq!(render(&["a", "b", "c"], 80), "\r\x1b[Ja\nb\nc\x1b[2A\r");
        assert_eq!(render(&["abcdef"], 4), "\r\x1b[Jabc\r");
        assert_eq!(render(&["é€x"], 3), "\r\x1b[Jé€\r");
    }
}
