//! The two log line formats, text and JSON, each naming the request a line was written in.
//!
//! Both read the task-local [`RequestLog`] only when a line is
//! written, so a request that logs nothing pays nothing for its context.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime as _, SystemTime};
use tracing_subscriber::registry::LookupSpan;

use super::request::{self, RequestLog};

/// `TIMESTAMP LEVEL request{method=… route=… request_id=… caller=…}: TARGET: MESSAGE FIELDS`.
pub struct Text;

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Records of the `log` crate (rustls, reqwest) carry their real target in fields.
        let normalized = event.normalized_metadata();
        let metadata = normalized.as_ref().unwrap_or_else(|| event.metadata());
        SystemTime.format_time(&mut writer)?;
        if writer.has_ansi_escapes() {
            // On a terminal, the level in its usual colour.
            let colour = match *metadata.level() {
                Level::ERROR => "31",
                Level::WARN => "33",
                Level::INFO => "32",
                Level::DEBUG => "34",
                Level::TRACE => "35",
            };
            write!(writer, " \x1b[{colour}m{:>5}\x1b[0m ", metadata.level())?;
        } else {
            write!(writer, " {:>5} ", metadata.level())?;
        }
        request::with_current(|log| write_request_text(&mut writer, log)).unwrap_or(Ok(()))?;
        write!(writer, "{}: ", metadata.target())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

fn write_request_text(writer: &mut Writer<'_>, log: &RequestLog) -> fmt::Result {
    write!(writer, "request{{method={}", log.method())?;
    if let Some(route) = log.route() {
        write!(writer, " route={route}")?;
    }
    write!(writer, " request_id={}", log.id())?;
    if let Some(caller) = log.caller() {
        write!(writer, " caller={caller}")?;
    }
    writer.write_str("}: ")
}

/// One JSON object per line: `timestamp`, `level`, the event's fields (`message` among them),
/// `target`, and the request under `span` (`name` = `request`, `method`, `route`, `request_id`,
/// `caller`).
pub struct Json;

impl<S, N> FormatEvent<S, N> for Json
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Records of the `log` crate (rustls, reqwest) carry their real target in fields.
        let normalized = event.normalized_metadata();
        let metadata = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = String::with_capacity(256);
        line.push_str("{\"timestamp\":\"");
        SystemTime.format_time(&mut Writer::new(&mut line))?;
        line.push_str("\",\"level\":");
        push_json_str(&mut line, metadata.level().as_str());
        let mut fields = JsonFields { line: &mut line };
        event.record(&mut fields);
        line.push_str(",\"target\":");
        push_json_str(&mut line, metadata.target());
        request::with_current(|log| {
            line.push_str(",\"span\":{\"name\":\"request\",\"method\":");
            push_json_str(&mut line, log.method().as_str());
            if let Some(route) = log.route() {
                line.push_str(",\"route\":");
                push_json_str(&mut line, route);
            }
            line.push_str(",\"request_id\":");
            push_json_str(&mut line, log.id());
            if let Some(caller) = log.caller() {
                line.push_str(",\"caller\":");
                push_json_str(&mut line, caller);
            }
            line.push('}');
        });
        line.push_str("}\n");
        writer.write_str(&line)
    }
}

/// Appends `text` as a JSON string (quoted and escaped).
pub fn push_json_str(line: &mut String, text: &str) {
    // Serialising a `str` into a `String` cannot fail.
    if let Ok(quoted) = serde_json::to_string(text) {
        line.push_str(&quoted);
    }
}

/// Writes an event's fields as `,"name":value` pairs.
struct JsonFields<'a> {
    line: &'a mut String,
}

impl JsonFields<'_> {
    /// Starts `,"name":`; false for the fields a `log` record's metadata travels in (shown as
    /// `target` already) and for names the line itself uses, which are skipped.
    fn key(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name.starts_with("log.") || matches!(name, "timestamp" | "level" | "target" | "span") {
            return false;
        }
        self.line.push(',');
        push_json_str(self.line, name);
        self.line.push(':');
        true
    }
}

impl Visit for JsonFields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if !self.key(field) {
            return;
        }
        match serde_json::Number::from_f64(value) {
            Some(number) => {
                let _ = write!(self.line, "{number}");
            }
            None => self.line.push_str("null"),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if !self.key(field) {
            return;
        }
        let _ = write!(self.line, "{value}");
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if !self.key(field) {
            return;
        }
        let _ = write!(self.line, "{value}");
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if !self.key(field) {
            return;
        }
        self.line.push_str(if value { "true" } else { "false" });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.key(field) {
            return;
        }
        push_json_str(self.line, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !self.key(field) {
            return;
        }
        push_json_str(self.line, &value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.key(field) {
            return;
        }
        push_json_str(self.line, &format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        let mut line = String::new();
        push_json_str(&mut line, "a\"b\\c\nd");
        assert_eq!(line, r#""a\"b\\c\nd""#);
    }
}
