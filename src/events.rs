//! The local event log: one JSON object a line, appended and flushed with a
//! single write each (the main job writes four per task; in Python each
//! cost about 20 µs of the GIL: a dict, `json.dumps`, a buffered write and
//! a flush).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crate::time::wall::WallTime;

/// One line being written: `{"event": ..., "time": ..., "elapsed": ...`,
/// then the fields in the order given.
pub struct JsonLine {
    text: Vec<u8>,
}

impl JsonLine {
    pub fn new(event: &str, time: WallTime, elapsed_seconds: f64) -> Self {
        let mut line = JsonLine {
            text: Vec::with_capacity(256),
        };
        line.text.push(b'{');
        line.key("event");
        line.quoted(event);
        line.string("time", time.isoformat().as_str());
        // Microseconds, as `round(elapsed, 6)` gave.
        line.float("elapsed", (elapsed_seconds * 1e6).round() / 1e6);
        line
    }

    fn key(&mut self, key: &str) {
        if self.text.len() > 1 {
            self.text.extend_from_slice(b", ");
        }
        self.quoted(key);
        self.text.extend_from_slice(b": ");
    }

    fn quoted(&mut self, value: &str) {
        // Writing into a Vec cannot fail, and a &str serialises always.
        let _ = serde_json::to_writer(&mut self.text, value);
    }

    pub fn string(&mut self, key: &str, value: &str) {
        self.key(key);
        self.quoted(value);
    }

    pub fn int(&mut self, key: &str, value: i64) {
        self.key(key);
        let _ = serde_json::to_writer(&mut self.text, &value);
    }

    /// As Python's `json.dumps`: `NaN`, `Infinity` and `-Infinity` for the
    /// values JSON has no number for.
    pub fn float(&mut self, key: &str, value: f64) {
        self.key(key);
        if value.is_nan() {
            self.text.extend_from_slice(b"NaN");
        } else if value.is_infinite() {
            let text: &[u8] = if value > 0.0 {
                b"Infinity"
            } else {
                b"-Infinity"
            };
            self.text.extend_from_slice(text);
        } else {
            let _ = serde_json::to_writer(&mut self.text, &value);
        }
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        self.key(key);
        let text: &[u8] = if value { b"true" } else { b"false" };
        self.text.extend_from_slice(text);
    }

    pub fn null(&mut self, key: &str) {
        self.key(key);
        self.text.extend_from_slice(b"null");
    }

    /// A value already in JSON (made by the caller).
    pub fn raw(&mut self, key: &str, json: &str) {
        self.key(key);
        self.text.extend_from_slice(json.as_bytes());
    }

    /// The line, with its newline.
    pub fn finish(mut self) -> Vec<u8> {
        self.text.extend_from_slice(b"}\n");
        self.text
    }
}

/// An append-only file of lines, each written whole with one `write` (so a
/// reader following the file sees whole lines, and lines from two threads
/// never interleave).
///
/// The lock is `std::sync`'s, not parking_lot's: it is held while writing
/// with the GIL released, so a thread may hold it when another forks (see
/// `bindings::dispatch::run_loop`).
pub struct LineLog {
    file: Mutex<Option<File>>,
    start: Instant,
}

impl LineLog {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().append(true).create(true).open(path)?;
        Ok(LineLog {
            file: Mutex::new(Some(file)),
            start: Instant::now(),
        })
    }

    /// Seconds since the log was opened (monotonic).
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn file(&self) -> MutexGuard<'_, Option<File>> {
        // Nothing panics while holding it; a poisoned lock is still whole.
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `line`; false once closed.
    pub fn append(&self, line: &[u8]) -> io::Result<bool> {
        let mut file = self.file();
        match file.as_mut() {
            Some(file) => file.write_all(line).map(|()| true),
            None => Ok(false),
        }
    }

    pub fn close(&self) {
        self.file().take();
    }

    pub fn is_closed(&self) -> bool {
        self.file().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::wall::DateTimeParts;

    fn at() -> WallTime {
        WallTime::from_parts(DateTimeParts {
            year: 2026,
            month: 11,
            day: 30,
            hour: 9,
            minute: 5,
            second: 7,
            microsecond: 120,
        })
        .unwrap()
    }

    #[test]
    fn a_line_is_one_json_object_with_the_fields_in_order() {
        let mut line = JsonLine::new("runner_finished", at(), 1.234_567_89);
        line.string("task_id", "a \"quoted\"\nid é");
        line.int("pid", -42);
        line.float("seconds", 0.5);
        line.float("bad", f64::NAN);
        line.bool("success", false);
        line.null("reason");
        line.raw("list", "[1, 2]");
        let text = String::from_utf8(line.finish()).unwrap();
        assert_eq!(
            text,
            "{\"event\": \"runner_finished\", \"time\": \"2026-11-30T09:05:07.000120\", \
             \"elapsed\": 1.234568, \"task_id\": \"a \\\"quoted\\\"\\nid é\", \"pid\": -42, \
             \"seconds\": 0.5, \"bad\": NaN, \"success\": false, \"reason\": null, \
             \"list\": [1, 2]}\n"
        );
    }

    #[test]
    fn lines_are_appended_until_closed() {
        let dir = std::env::temp_dir().join(format!("nd-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        std::fs::write(&path, "{\"earlier\": 1}\n").unwrap();
        let log = LineLog::open(&path).unwrap();
        assert!(log.append(b"{\"a\": 1}\n").unwrap());
        log.close();
        assert!(log.is_closed());
        assert!(!log.append(b"{\"b\": 2}\n").unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"earlier\": 1}\n{\"a\": 1}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
