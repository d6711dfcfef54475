//! Running QEMU with a time limit and capturing its console.
//!
//! QEMU's stdout and stderr are read by two threads that append whole lines
//! to one log (and echo them to our stdout when asked); the main thread waits for QEMU or
//! the deadline. A QEMU that outlives its time limit is killed with its
//! whole process group when it was started in a group of its own
//! ([`Options::own_group`]), or alone otherwise.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How a QEMU run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// QEMU exited by itself with this status.
    Exited(i32),
    /// QEMU was killed by a signal from elsewhere.
    Signaled(i32),
    /// QEMU was still running at the time limit and was killed.
    TimedOut(Duration),
}

impl Outcome {
    /// Whether the system ended as its manifest says it should.
    pub fn is_success(&self) -> bool {
        *self == Outcome::Exited(abi::exit::QEMU_SUCCESS)
    }

    fn from_status(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => Outcome::Exited(c),
            (None, Some(s)) => Outcome::Signaled(s),
            (None, None) => Outcome::Exited(-1),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Outcome::Exited(c) if c == abi::exit::QEMU_SUCCESS => {
                write!(
                    f,
                    "QEMU exited with status {c}: the system reported success"
                )
            }
            Outcome::Exited(c) if c == abi::exit::QEMU_FAILURE => {
                write!(
                    f,
                    "QEMU exited with status {c}: the system reported failure"
                )
            }
            Outcome::Exited(1) => write!(f, "QEMU exited with status 1: QEMU itself failed"),
            Outcome::Exited(c) => write!(
                f,
                "QEMU exited with status {c}, which is neither the system's success ({}) \
                 nor its failure ({})",
                abi::exit::QEMU_SUCCESS,
                abi::exit::QEMU_FAILURE
            ),
            Outcome::Signaled(s) => write!(f, "QEMU was killed by signal {s}"),
            Outcome::TimedOut(d) => {
                write!(
                    f,
                    "QEMU timed out after {} s and was killed",
                    d.as_secs_f64()
                )
            }
        }
    }
}

/// How to run QEMU.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Kill it after this long; `None`: wait for ever.
    pub timeout: Option<Duration>,
    /// Copy the console to our stdout as it arrives.
    pub echo: bool,
    /// Start it in a process group of its own and kill the group on timeout.
    /// Off for an interactive `run`, so that Ctrl-C reaches QEMU too.
    pub own_group: bool,
}

/// A finished run.
#[derive(Clone, Debug)]
pub struct Run {
    pub outcome: Outcome,
    /// Everything QEMU wrote to stdout and stderr, in arrival order.
    pub log: String,
    pub elapsed: Duration,
}

unsafe extern "C" {
    /// POSIX `kill(2)`; a negative pid names a process group.
    fn kill(pid: i32, sig: i32) -> i32;
}

const SIGKILL: i32 = 9;

fn kill_group(pgid: u32) {
    let Ok(pgid) = i32::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: `kill` takes no pointers; a negative pid addresses the process
    // group that `process_group(0)` created with QEMU as its leader (its pid,
    // checked above to be a real one, so never "every process" (-1)).
    unsafe {
        kill(-pgid, SIGKILL);
    }
}

/// Runs `cmd` (QEMU), feeding it no input, until it exits or times out.
pub fn run(mut cmd: Command, opts: Options) -> io::Result<Run> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if opts.own_group {
        cmd.process_group(0);
    }
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let mut readers = Vec::new();
    let pipes: [Option<Box<dyn Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ];
    // Each stream goes on in whole lines, so a line QEMU prints on stderr
    // never lands inside a console line (the serial port's bytes arrive in
    // many small writes).
    for mut pipe in pipes.into_iter().flatten() {
        let tx = tx.clone();
        readers.push(thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut partial = Vec::new();
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                partial.extend_from_slice(&buf[..n]);
                if let Some(end) = partial.iter().rposition(|&b| b == b'\n') {
                    let rest = partial.split_off(end + 1);
                    if tx.send(core::mem::replace(&mut partial, rest)).is_err() {
                        return;
                    }
                }
            }
            if !partial.is_empty() {
                let _ = tx.send(partial);
            }
        }));
    }
    drop(tx);

    let mut log = Vec::new();
    let mut take = |chunk: Vec<u8>| {
        if opts.echo {
            let mut out = io::stdout().lock();
            let _ = out.write_all(&chunk);
            let _ = out.flush();
        }
        log.extend_from_slice(&chunk);
    };
    let deadline = opts.timeout.map(|t| start + t);
    let outcome = loop {
        if let Some(status) = child.try_wait()? {
            break Outcome::from_status(status);
        }
        if let Some(d) = deadline {
            if Instant::now() >= d {
                if opts.own_group {
                    kill_group(child.id());
                }
                let _ = child.kill();
                let _ = child.wait();
                break Outcome::TimedOut(opts.timeout.unwrap_or_default());
            }
        }
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(20)) {
            take(chunk);
        }
    };
    let elapsed = start.elapsed();
    // QEMU is gone: its pipes reach end of file once every process holding
    // them is (the group kill saw to any helper).
    for chunk in rx.iter() {
        take(chunk);
    }
    for r in readers {
        let _ = r.join();
    }
    Ok(Run {
        outcome,
        log: String::from_utf8_lossy(&log).into_owned(),
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    fn opts(timeout_ms: u64) -> Options {
        Options {
            timeout: Some(Duration::from_millis(timeout_ms)),
            echo: false,
            own_group: true,
        }
    }

    #[test]
    fn captures_both_streams_and_the_status() {
        let r = run(
            sh("echo 'EV {\"ev\":\"ready\"}'; echo oops >&2; exit 33"),
            opts(10_000),
        )
        .unwrap();
        assert_eq!(r.outcome, Outcome::Exited(33));
        assert!(r.outcome.is_success());
        assert!(r.log.contains("EV {\"ev\":\"ready\"}\n"), "{}", r.log);
        assert!(r.log.contains("oops\n"), "{}", r.log);
    }

    #[test]
    fn a_stderr_line_never_lands_inside_a_console_line() {
        // The console line is written in two pieces with a whole stderr
        // line between them, as QEMU's serial output and its warnings do.
        let r = run(
            sh(
                "printf 'EV {\"ev\":'; sleep 0.2; echo 'New fault is not recorded' >&2; \
                sleep 0.2; printf '\"ready\"}\\n'; printf tail; exit 33",
            ),
            opts(10_000),
        )
        .unwrap();
        assert!(r.log.contains("EV {\"ev\":\"ready\"}\n"), "{:?}", r.log);
        assert!(r.log.contains("New fault is not recorded\n"), "{:?}", r.log);
        assert!(
            r.log.ends_with("tail"),
            "an unfinished last line is kept: {:?}",
            r.log
        );
    }

    #[test]
    fn a_hung_process_group_is_killed_at_the_deadline() {
        // The shell starts a child that would hold the pipes open for a
        // minute: only a group kill ends both in time.
        let r = run(sh("echo started; sleep 60 & sleep 60"), opts(300)).unwrap();
        assert_eq!(r.outcome, Outcome::TimedOut(Duration::from_millis(300)));
        assert!(r.elapsed < Duration::from_secs(20), "{:?}", r.elapsed);
        assert!(r.log.contains("started"), "{}", r.log);
        assert!(r.outcome.to_string().contains("timed out after 0.3 s"));
    }

    #[test]
    fn outcomes_say_what_happened() {
        assert!(Outcome::Exited(35).to_string().contains("reported failure"));
        assert!(Outcome::Exited(1)
            .to_string()
            .contains("QEMU itself failed"));
        assert!(Outcome::Exited(3).to_string().contains("neither"));
        assert!(Outcome::Signaled(9).to_string().contains("signal 9"));
    }
}
