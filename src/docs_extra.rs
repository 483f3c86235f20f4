//! Hand-written man page sections appended to the generated ones (roff), for what flags cannot
//! say: the run document, exit statuses, the sandbox set-up order.

/// Extra roff for the man page named `name` (`executor`, `executor-run-steps`, ...).
pub fn man_section(name: &str) -> Option<&'static str> {
    match name {
        "executor" => Some(EXIT_STATUS),
        _ => None,
    }
}

const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
0
the stage did its work (or skipped it because an earlier stage had failed and recorded why)
.TP
1
the job failed; the run document that was written says why
.TP
2
usage: bad flags or configuration
.TP
3
the input run document could not be read
.TP
4
dequeue: no job was available
.TP
75
a temporary infrastructure failure (the coordinator could not be reached); try again
"#;
