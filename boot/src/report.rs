//! Reading results out of test output: cargo's per-binary summaries and the kernel's serial log.

/// The line prefix the kernel prints last, before it stops the emulator.
const EXIT_MARKER: &str = "[exit] ";

/// How the kernel said it ended.
#[derive(Debug, PartialEq, Eq)]
pub enum KernelExit {
    /// `[exit] success`
    Success,
    /// `[exit] failure: <reason>`
    Failure(String),
}

/// What one kernel boot reported over serial.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KernelRun {
    /// Tests whose line ended in `ok`.
    pub passed: usize,
    /// Tests whose line said `FAILED`.
    pub failed: usize,
    /// Tests the backend skips (`skipped: REASON`), each with its reason.
    pub skipped: Vec<String>,
    /// The exit line, if the kernel got that far.
    pub exit: Option<KernelExit>,
}

impl KernelRun {
    /// Parses the serial log of one boot. Counts come from the individual `test NAME ... ok` and
    /// `... FAILED` lines, so a run cut short still counts what it did.
    pub fn parse(serial: &str) -> KernelRun {
        let mut run = KernelRun::default();
        for line in serial.lines().map(|l| l.trim_end_matches('\r')) {
            if let Some(result) = line.strip_prefix("test ").and_then(|l| l.split_once(" ... ")) {
                if result.1.starts_with("ok") {
                    run.passed += 1;
                } else if result.1.starts_with("FAILED") {
                    run.failed += 1;
                } else if result.1.starts_with("skipped") {
                    run.skipped.push(line.to_string());
                }
            } else if let Some(exit) = line.strip_prefix(EXIT_MARKER) {
                run.exit = Some(match exit.strip_prefix("failure: ") {
                    Some(reason) => KernelExit::Failure(reason.to_string()),
                    None if exit == "success" => KernelExit::Success,
                    None => KernelExit::Failure(exit.to_string()),
                });
            }
        }
        run
    }
}

/// Sum of the `test result:` lines cargo prints per test binary.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HostTestCounts {
    /// Tests that passed, over all binaries and doc-tests.
    pub passed: usize,
    /// Tests that failed.
    pub failed: usize,
}

impl HostTestCounts {
    /// Parses `test result: ok. 12 passed; 0 failed; ...` lines out of `cargo test` output.
    pub fn parse(stdout: &str) -> HostTestCounts {
        let mut counts = HostTestCounts::default();
        for line in stdout.lines() {
            let Some(summary) = line.strip_prefix("test result: ") else {
                continue;
            };
            counts.passed += count_before(summary, " passed");
            counts.failed += count_before(summary, " failed");
        }
        counts
    }
}

/// The number written just before `label` in `text` (0 when absent).
fn count_before(text: &str, label: &str) -> usize {
    let Some(end) = text.find(label) else {
        return 0;
    };
    let digits_start = text[..end]
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    text[digits_start..end].parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counts_and_exit_are_read_from_serial() {
        let serial = "boot\r\ntest a ... ok (10 ticks)\r\ntest b ... FAILED: x (3 ticks)\r\n\
                      test c ... ok (1 ticks)\r\n2 passed, 1 failed\r\n[exit] failure: 1 test(s) failed\r\n";
        let run = KernelRun::parse(serial);
        assert_eq!(run.passed, 2);
        assert_eq!(run.failed, 1);
        assert_eq!(run.exit, Some(KernelExit::Failure("1 test(s) failed".into())));
    }

    #[test]
    fn kernel_run_without_exit_line_has_no_exit() {
        let run = KernelRun::parse("test a ... ok (1 ticks)\n");
        assert_eq!(run.exit, None);
        assert_eq!(
            KernelRun::parse("[exit] success\n").exit,
            Some(KernelExit::Success)
        );
    }

    #[test]
    fn host_counts_sum_every_binary() {
        let out = "test result: ok. 12 passed; 0 failed; 0 ignored\n\
                   test result: FAILED. 3 passed; 2 failed; 1 ignored\n\
                   test result: ok. 0 passed; 0 failed; 0 ignored\n";
        assert_eq!(
            HostTestCounts::parse(out),
            HostTestCounts {
                passed: 15,
                failed: 2
            }
        );
    }
}
