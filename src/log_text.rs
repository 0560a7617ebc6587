//! Text log lines that a client cannot forge: every field value (and the
//! message) has its control characters escaped, so a user name, database
//! or application name with a newline or a terminal escape in it stays
//! inside its own line. JSON logs escape by themselves.

use std::fmt::Write as _;

use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{Writer, debug_fn};

/// The field formatter for `--log-format text`.
pub fn fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    debug_fn(
        |w: &mut Writer<'_>, field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
            let mut text = String::new();
            let _ = write!(text, "{value:?}");
            let text = escape_controls(&text);
            if field.name() == "message" {
                w.write_str(&text)
            } else {
                write!(w, "{}={text}", field.name())
            }
        },
    )
    .delimited(" ")
}

/// `\n`, `\r`, `\t` as such; every other control character as `\u{..}`.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A client-chosen user name and an error text carrying it cannot add
    /// a line of their own or a terminal escape to the log.
    #[test]
    fn client_text_cannot_forge_a_log_line() {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(fields())
            .with_writer(move || writer.clone())
            .finish();
        let user = "eve\n2026-12-01T00:00:00Z  INFO forged: session started person=ceo\x1b[2J";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("session", user = %user);
            let _g = span.enter();
            let error = format!("database user \"{user}\" is not yours");
            tracing::warn!(error = %error, code = 28000, "connection refused: {user}");
        });
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.matches('\n').count(), 1, "{out}");
        assert!(!out.contains('\x1b'), "{out}");
        assert!(
            out.contains(r"user=eve\n2026-12-01T00:00:00Z  INFO forged"),
            "{out}"
        );
        assert!(out.contains("code=28000"), "{out}");
        assert!(out.contains(r"connection refused: eve\n"), "{out}");
    }

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        assert!(matches!(
            escape_controls("arianna"),
            std::borrow::Cow::Borrowed("arianna")
        ));
        assert_eq!(escape_controls("a\u{7f}b\u{85}"), "a\\u{7f}b\\u{85}");
    }
}
