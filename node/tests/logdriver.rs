//! The real `capstan-node log-driver` started the way containerd 1.6's shim
//! starts a `binary://` logger: argv from the URI's query, CONTAINER_ID and
//! CONTAINER_NAMESPACE in the env, the container's stdout and stderr pipes
//! on fds 3 and 4, the ready pipe on fd 5.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use capstan_node::logdriver::{log_files, log_uri, LogDriverConfig};
use capstan_node::podlogs::{read_logs, ReadOptions};

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// argv as the shim builds it: each query key, then its (decoded) value.
fn shim_argv(uri: &str) -> (String, Vec<String>) {
    let rest = uri.strip_prefix("binary://").unwrap();
    let (path, query) = rest.split_once('?').unwrap();
    let mut args = Vec::new();
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=').unwrap();
        args.push(decode(k));
        args.push(decode(v));
    }
    (decode(path), args)
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// The driver process and our ends of its pipes; kills it if a test fails.
struct Driver {
    child: Child,
    stdout: Option<File>,
    stderr: Option<File>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(cfg: &LogDriverConfig) -> Driver {
        let uri = log_uri(Path::new(env!("CARGO_BIN_EXE_capstan-node")), cfg);
        let (program, args) = shim_argv(&uri);
        assert_eq!(args[0], "log-driver");
        let (out_r, out_w) = pipe();
        let (err_r, err_w) = pipe();
        let (ready_r, ready_w) = pipe();
        let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
        let mut cmd = Command::new(program);
        cmd.args(&args).env_clear().env("CONTAINER_ID", "c1").env("CONTAINER_NAMESPACE", "capstan");
        // SAFETY: only async-signal-safe calls between fork and exec. The
        // descriptors first move above 100 so that placing them on 3..5
        // cannot overwrite one another.
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [0; 3];
                for (i, fd) in fds.iter().enumerate() {
                    high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, fd) in high.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop((out_r, err_r, ready_w));
        // The shim waits for the ready pipe to close (or get a byte).
        let mut ready = File::from(ready_r);
        let mut pfd = libc::pollfd { fd: ready.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(n, 1, "the driver never said it was ready");
        let mut b = [0u8; 1];
        let _ = ready.read(&mut b);
        Driver { child, stdout: Some(File::from(out_w)), stderr: Some(File::from(err_w)) }
    }

    fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "log driver did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn writes_cri_lines_with_partials_and_exits_at_eof() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pods/ns_pod_uid/c/0.log");
    let cfg = LogDriverConfig { path: path.clone(), max_size: 1 << 20, max_files: 2, max_line: 16, fifos: None };
    let mut d = Driver::start(&cfg);
    assert!(path.exists(), "ready before the log file was open");
    let out = d.stdout.as_mut().unwrap();
    out.write_all(b"hello\nworld\n").unwrap();
    out.write_all(b"a line longer than sixteen bytes\n").unwrap();
    d.stderr.as_mut().unwrap().write_all(b"oops\n").unwrap();
    d.stdout.as_mut().unwrap().write_all(b"no newline at the end").unwrap();
    d.stdout = None;
    d.stderr = None;
    assert!(d.wait(Duration::from_secs(10)).success());

    let raw = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = raw.lines().collect();
    for l in &lines {
        let mut f = l.splitn(4, ' ');
        let ts = f.next().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{l}");
        assert!(matches!(f.next(), Some("stdout" | "stderr")), "{l}");
        assert!(matches!(f.next(), Some("F" | "P")), "{l}");
    }
    assert!(lines.iter().any(|l| l.ends_with(" stdout F hello")), "{raw}");
    assert!(lines.iter().any(|l| l.ends_with(" stdout P a line longer th")), "{raw}");
    assert!(lines.iter().any(|l| l.ends_with(" stderr F oops")), "{raw}");
    assert!(lines.iter().any(|l| l.ends_with(" stdout P e end")), "{raw}");

    let text = String::from_utf8(read_logs(&log_files(&path).unwrap(), &ReadOptions::default()).unwrap()).unwrap();
    let mut got: Vec<&str> = text.split_inclusive('\n').collect();
    got.sort();
    let mut want = vec!["hello\n", "world\n", "a line longer than sixteen bytes\n", "oops\n", "no newline at the end"];
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn rotates_under_max_size_and_keeps_max_files() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("0.log");
    let cfg = LogDriverConfig { path: path.clone(), max_size: 1000, max_files: 3, max_line: 1024, fifos: None };
    let mut d = Driver::start(&cfg);
    let out = d.stdout.as_mut().unwrap();
    for i in 0..300 {
        writeln!(out, "line {i:04}").unwrap();
    }
    d.stdout = None;
    d.stderr = None;
    assert!(d.wait(Duration::from_secs(10)).success());
    let files = log_files(&path).unwrap();
    assert_eq!(files.len(), 3, "{files:?}");
    for f in &files {
        assert!(std::fs::metadata(f).unwrap().len() <= 1000, "{f:?}");
    }
    let text =
        String::from_utf8(read_logs(&files, &ReadOptions { tail: Some(2), ..Default::default() }).unwrap()).unwrap();
    assert_eq!(text, "line 0298\nline 0299\n");
}

#[test]
fn sigterm_stops_it_even_while_a_writer_keeps_the_pipe_open() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("0.log");
    let mut d = Driver::start(&LogDriverConfig::new(&path));
    d.stdout.as_mut().unwrap().write_all(b"done\nhalf a line").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let status = d.wait(Duration::from_secs(8));
    assert!(status.success(), "{status}");
    let text = String::from_utf8(read_logs(&log_files(&path).unwrap(), &ReadOptions::default()).unwrap()).unwrap();
    assert_eq!(text, "done\nhalf a line");
}

#[test]
fn without_the_shim_fds_it_fails_clearly() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_capstan-node"));
    cmd.args(["log-driver", "--path", "/nonexistent/x.log"]);
    // SAFETY: close() only, between fork and exec. (The test runner may
    // have inherited descriptors there, e.g. cargo's jobserver.)
    unsafe {
        cmd.pre_exec(|| {
            for fd in 3..=5 {
                libc::close(fd);
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fd 3") || err.contains("fd 4") || err.contains("fd 5"), "{err}");
}

#[test]
fn a_line_that_waits_for_input_is_written_as_a_partial_and_read_back_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("0.log");
    let mut d = Driver::start(&LogDriverConfig::new(&path));
    // A shell's prompt: no newline until the user answers.
    d.stdout.as_mut().unwrap().write_all(b"/ # ").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&path).unwrap().contains(" stdout P / # ") {
        assert!(Instant::now() < deadline, "the prompt never reached the file: {:?}", std::fs::read_to_string(&path));
        std::thread::sleep(Duration::from_millis(20));
    }
    d.stdout.as_mut().unwrap().write_all(b"echo hi\nhi\n").unwrap();
    d.stdout = None;
    d.stderr = None;
    assert!(d.wait(Duration::from_secs(10)).success());
    let raw = std::fs::read_to_string(&path).unwrap();
    assert!(raw.lines().any(|l| l.ends_with(" stdout F echo hi")), "{raw}");
    let text = String::from_utf8(read_logs(&log_files(&path).unwrap(), &ReadOptions::default()).unwrap()).unwrap();
    assert_eq!(text, "/ # echo hi\nhi\n", "readers join the partial piece with its line");
}
