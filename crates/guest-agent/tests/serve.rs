//! The agent's request handling over a Unix socket pair, with real
//! processes on this host: what the guest runs, minus the VM. Malformed
//! input gets an error answer and the agent keeps serving.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use supermachine_agent_protocol::*;
use supermachine_guest_agent::{Agent, Reaper};

fn agent() -> Arc<Agent> {
    static AGENT: OnceLock<Arc<Agent>> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            Arc::new(Agent::new(
                Reaper::start().unwrap(),
                "/".into(),
                "test-host".into(),
                false,
            ))
        })
        .clone()
}

/// A connection to a fresh serving thread, after the handshake.
fn connect() -> UnixStream {
    let mut host = raw_connect();
    send_handshake(&mut host).unwrap();
    expect_handshake(&mut host).unwrap();
    host
}

fn raw_connect() -> UnixStream {
    let (host, guest) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let a = agent();
    std::thread::spawn(move || a.serve(guest));
    host
}

fn send(s: &mut UnixStream, m: HostMessage) {
    write_frame(s, &m).unwrap();
}

fn recv(s: &mut UnixStream) -> AgentMessage {
    read_frame(s)
        .unwrap()
        .expect("the agent closed the connection")
}

fn request(s: &mut UnixStream, r: Request) -> AgentMessage {
    send(s, HostMessage::Request(r));
    recv(s)
}

fn ping_ok(s: &mut UnixStream) {
    assert_eq!(request(s, Request::Ping), AgentMessage::Ok);
}

fn exec_req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        user: None,
        stdin: false,
        tty: None,
        timeout_ms: None,
        keep: false,
    }
}

#[derive(Debug, Default)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExitStatus>,
}

/// Reads a session to its exit and acknowledges it.
fn collect(s: &mut UnixStream) -> Collected {
    let mut c = Collected::default();
    loop {
        match recv(s) {
            AgentMessage::Stdout(b) => c.stdout.extend(b),
            AgentMessage::Stderr(b) => c.stderr.extend(b),
            AgentMessage::StdinConsumed(_) => {}
            AgentMessage::Exit(e) => {
                c.exit = Some(e);
                send(s, HostMessage::Done);
                return c;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn start(s: &mut UnixStream, req: ExecRequest) -> i32 {
    match request(s, Request::Exec(req)) {
        AgentMessage::Started { pid } => pid,
        other => panic!("expected Started, got {other:?}"),
    }
}

#[test]
fn exec_streams_output_and_reports_the_exit_then_serves_on() {
    let mut s = connect();
    let mut req = exec_req(&[
        "sh",
        "-c",
        "echo out; echo err >&2; pwd; echo $GREETING; exit 3",
    ]);
    req.env = vec!["GREETING=hello".into()];
    req.cwd = Some("/tmp".into());
    start(&mut s, req);
    let c = collect(&mut s);
    assert_eq!(String::from_utf8_lossy(&c.stdout), "out\n/tmp\nhello\n");
    assert_eq!(c.stderr, b"err\n");
    let exit = c.exit.unwrap();
    assert_eq!(
        (exit.code, exit.signal, exit.timed_out),
        (Some(3), None, false)
    );
    assert!(exit.peak_rss_kib > 0);
    // The same connection serves the next request.
    ping_ok(&mut s);
    start(&mut s, exec_req(&["sh", "-c", "kill -9 $$"]));
    let exit = collect(&mut s).exit.unwrap();
    assert_eq!((exit.code, exit.signal), (None, Some(9)));
    ping_ok(&mut s);
}

#[test]
fn exec_failures_are_answers_not_hangups() {
    let mut s = connect();
    let cases: [(ExecRequest, ErrorKind, &str); 4] = [
        (
            exec_req(&["no-such-program-anywhere"]),
            ErrorKind::NotFound,
            "exec: \"no-such-program-anywhere\": executable file not found in $PATH",
        ),
        (
            exec_req(&[]),
            ErrorKind::InvalidRequest,
            "exec needs a program (argv is empty)",
        ),
        (
            ExecRequest {
                cwd: Some("/no/such/dir".into()),
                ..exec_req(&["true"])
            },
            ErrorKind::NotFound,
            "working directory /no/such/dir: no such directory",
        ),
        (
            ExecRequest {
                user: Some(User::Spec("no-such-user-here".into())),
                ..exec_req(&["true"])
            },
            ErrorKind::NotFound,
            "unable to find user no-such-user-here: no matching entries in passwd file",
        ),
    ];
    for (req, kind, message) in cases {
        match request(&mut s, Request::Exec(req)) {
            AgentMessage::Error(e) => assert_eq!((e.kind, e.message.as_str()), (kind, message)),
            other => panic!("expected an error, got {other:?}"),
        }
    }
    ping_ok(&mut s);
}

#[test]
fn stdin_is_fed_within_the_window_to_end_of_file() {
    let mut s = connect();
    start(
        &mut s,
        ExecRequest {
            stdin: true,
            ..exec_req(&["wc", "-c"])
        },
    );
    let total = 3 * STDIN_WINDOW as usize + 123;
    let mut sent = 0usize;
    let mut acked = 0usize;
    while sent < total {
        // Never more than the window outstanding.
        while sent - acked + CHUNK > STDIN_WINDOW as usize {
            match recv(&mut s) {
                AgentMessage::StdinConsumed(n) => acked += n as usize,
                other => panic!("unexpected {other:?}"),
            }
        }
        let n = CHUNK.min(total - sent);
        send(&mut s, HostMessage::Stdin(vec![b'x'; n]));
        sent += n;
    }
    send(&mut s, HostMessage::CloseStdin);
    let c = collect(&mut s);
    assert_eq!(String::from_utf8_lossy(&c.stdout).trim(), total.to_string());
    assert_eq!(c.exit.unwrap().code, Some(0));
    ping_ok(&mut s);
}

#[test]
fn overrunning_the_stdin_window_ends_the_session() {
    let mut s = connect();
    // `sleep` never reads its stdin, so nothing is consumed.
    start(
        &mut s,
        ExecRequest {
            stdin: true,
            ..exec_req(&["sleep", "30"])
        },
    );
    // The pipe itself takes one chunk; the window the rest.
    for _ in 0..(STDIN_WINDOW as usize / CHUNK + 2) {
        send(&mut s, HostMessage::Stdin(vec![0; CHUNK]));
    }
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the agent should hang up on a host that ignores the window");
    // A fresh connection still works.
    ping_ok(&mut connect());
}

#[test]
fn a_timeout_kills_the_process_tree_and_says_so() {
    let mut s = connect();
    let started = Instant::now();
    let pid = start(
        &mut s,
        ExecRequest {
            timeout_ms: Some(300),
            keep: false,
            ..exec_req(&["sh", "-c", "sleep 30 & sleep 30; echo never"])
        },
    );
    let c = collect(&mut s);
    let exit = c.exit.unwrap();
    assert!(exit.timed_out);
    assert_eq!(exit.signal, Some(9));
    assert!(c.stdout.is_empty());
    assert!(started.elapsed() < Duration::from_secs(20));
    // Nothing of the group is left (outside a guest, the orphaned
    // `sleep` is reaped by this host's init, which may take a moment).
    let gone = Instant::now();
    // SAFETY: kill with signal 0 only checks for existence.
    while unsafe { libc::kill(-pid, 0) } == 0 {
        assert!(
            gone.elapsed() < Duration::from_secs(10),
            "the process group still exists"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn signals_reach_the_process() {
    let mut s = connect();
    start(&mut s, exec_req(&["sleep", "30"]));
    send(
        &mut s,
        HostMessage::Signal {
            signal: 15,
            group: false,
        },
    );
    assert_eq!(collect(&mut s).exit.unwrap().signal, Some(15));
}

#[test]
fn a_terminal_session_sees_its_size_and_resizes() {
    let mut s = connect();
    start(
        &mut s,
        ExecRequest {
            stdin: true,
            tty: Some(WindowSize { rows: 33, cols: 99 }),
            ..exec_req(&["sh", "-c", "stty size; tty; read x; stty size"])
        },
    );
    // Wait for the first size before resizing.
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("/dev/pts/") {
        match recv(&mut s) {
            AgentMessage::Stdout(b) => out.extend(b),
            other => panic!("unexpected {other:?}"),
        }
    }
    send(
        &mut s,
        HostMessage::Resize(WindowSize {
            rows: 50,
            cols: 132,
        }),
    );
    send(&mut s, HostMessage::Stdin(b"go\n".to_vec()));
    let c = collect(&mut s);
    out.extend(c.stdout);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("33 99\r\n/dev/pts/"), "{text:?}");
    assert!(text.contains("50 132"), "{text:?}");
    assert_eq!(c.exit.unwrap().code, Some(0));
}

#[test]
fn files_round_trip_with_mode_and_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/dir/file.bin");
    let contents: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut s = connect();
    send(
        &mut s,
        HostMessage::Request(Request::WriteFile(WriteFileRequest {
            path: path.display().to_string(),
            mode: 0o640,
            uid: 0,
            gid: 0,
            create_parents: true,
        })),
    );
    for piece in contents.chunks(CHUNK) {
        send(&mut s, HostMessage::FileChunk(piece.to_vec()));
    }
    send(&mut s, HostMessage::FileEnd);
    assert_eq!(recv(&mut s), AgentMessage::Ok);
    assert_eq!(std::fs::read(&path).unwrap(), contents);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    // Nothing staged is left beside it.
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );

    send(
        &mut s,
        HostMessage::Request(Request::ReadFile {
            path: path.display().to_string(),
        }),
    );
    let AgentMessage::FileInfo { size, mode, .. } = recv(&mut s) else {
        panic!("expected FileInfo")
    };
    assert_eq!((size, mode & 0o7777), (contents.len() as u64, 0o640));
    let mut back = Vec::new();
    loop {
        match recv(&mut s) {
            AgentMessage::FileChunk(b) => back.extend(b),
            AgentMessage::FileEnd => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(back, contents);

    // A write into a missing directory (no create_parents): every chunk is
    // still read, the answer is an error, the connection goes on.
    send(
        &mut s,
        HostMessage::Request(Request::WriteFile(WriteFileRequest {
            path: dir.path().join("missing/x").display().to_string(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            create_parents: false,
        })),
    );
    send(&mut s, HostMessage::FileChunk(vec![1; 10]));
    send(&mut s, HostMessage::FileEnd);
    let AgentMessage::Error(e) = recv(&mut s) else {
        panic!("expected an error")
    };
    assert_eq!(e.kind, ErrorKind::NotFound);
    match request(
        &mut s,
        Request::ReadFile {
            path: "relative/path".into(),
        },
    ) {
        AgentMessage::Error(e) => assert_eq!(e.kind, ErrorKind::InvalidRequest),
        other => panic!("unexpected {other:?}"),
    }
    match request(
        &mut s,
        Request::ReadFile {
            path: "/no/such/file".into(),
        },
    ) {
        AgentMessage::Error(e) => assert_eq!(e.kind, ErrorKind::NotFound),
        other => panic!("unexpected {other:?}"),
    }
    ping_ok(&mut s);
}

#[test]
fn connect_splices_a_tcp_stream_both_ways() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        got.reverse();
        c.write_all(&got).unwrap();
    });
    let mut s = connect();
    assert_eq!(request(&mut s, Request::Connect { port }), AgentMessage::Ok);
    let data: Vec<u8> = (0..500_000u32).map(|i| i as u8).collect();
    s.write_all(&data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    back.reverse();
    assert_eq!(back, data);
    server.join().unwrap();

    // A closed port is an error answer.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut s = connect();
    match request(&mut s, Request::Connect { port }) {
        AgentMessage::Error(e) => assert_eq!(e.kind, ErrorKind::ConnectionRefused),
        other => panic!("unexpected {other:?}"),
    }
    // The refused connection serves the next request.
    ping_ok(&mut s);
}

#[test]
fn malformed_frames_get_clear_errors_and_the_agent_keeps_serving() {
    // An unknown message: an error, and the same connection goes on.
    let mut s = connect();
    s.write_all(&[1, 0, 0, 0, 0x7f]).unwrap();
    let AgentMessage::Error(e) = recv(&mut s) else {
        panic!("expected an error")
    };
    assert_eq!(e.kind, ErrorKind::Protocol);
    assert!(
        e.message.starts_with("undecodable message"),
        "{}",
        e.message
    );
    // A message out of place: the same.
    send(&mut s, HostMessage::FileEnd);
    let AgentMessage::Error(e) = recv(&mut s) else {
        panic!("expected an error")
    };
    assert_eq!(e.message, "expected a request, got FileEnd");
    ping_ok(&mut s);

    // An oversized frame: an error, then the connection is closed.
    let mut s = connect();
    s.write_all(&(MAX_FRAME + 1).to_le_bytes()).unwrap();
    let AgentMessage::Error(e) = recv(&mut s) else {
        panic!("expected an error")
    };
    assert!(e.message.contains("larger than the"), "{}", e.message);
    assert!(read_frame::<_, AgentMessage>(&mut s).unwrap().is_none());

    // A truncated frame: the host hangs up mid-frame.
    let mut s = connect();
    s.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let AgentMessage::Error(e) = recv(&mut s) else {
        panic!("expected an error")
    };
    assert!(
        e.message.contains("connection ended inside a frame"),
        "{}",
        e.message
    );

    // A version mismatch: our handshake, an error naming both versions.
    let mut s = raw_connect();
    write_frame(
        &mut s,
        &Handshake {
            magic: MAGIC,
            version: PROTOCOL_VERSION + 7,
        },
    )
    .unwrap();
    expect_handshake(&mut s).unwrap();
    let AgentMessage::Error(e) = recv(&mut s) else {
        panic!("expected an error")
    };
    assert_eq!(e.kind, ErrorKind::VersionMismatch);
    assert!(
        e.message
            .contains(&format!("the peer version {}", PROTOCOL_VERSION + 7))
    );
    assert!(read_frame::<_, AgentMessage>(&mut s).unwrap().is_none());

    // Not a supermachine peer at all.
    let mut s = raw_connect();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    expect_handshake(&mut s).unwrap();
    assert!(matches!(recv(&mut s), AgentMessage::Error(_)));

    // Through all of that, the agent serves new connections.
    ping_ok(&mut connect());
}

#[test]
fn system_operations_are_refused_outside_pid_1() {
    let mut s = connect();
    for r in [
        Request::SetClock(Clock::now()),
        Request::AddEntropy(vec![0; 8]),
        Request::Shutdown { grace_ms: 0 },
    ] {
        let AgentMessage::Error(e) = request(&mut s, r) else {
            panic!("expected an error")
        };
        assert!(e.message.contains("not the guest's PID 1"), "{}", e.message);
    }
    ping_ok(&mut s);
}

#[test]
fn fifty_concurrent_execs_each_get_their_own_output() {
    let threads: Vec<_> = (0..50)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = connect();
                start(
                    &mut s,
                    exec_req(&["sh", "-c", &format!("for j in 1 2 3; do echo {i}-$j; done")]),
                );
                let c = collect(&mut s);
                assert_eq!(
                    String::from_utf8_lossy(&c.stdout),
                    format!("{i}-1\n{i}-2\n{i}-3\n")
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Reads frames until `Parked`, collecting stdout.
fn read_until_parked(s: &mut UnixStream, stdout: &mut Vec<u8>) {
    loop {
        match recv(s) {
            AgentMessage::Stdout(b) => stdout.extend(b),
            AgentMessage::Parked => return,
            other => panic!("expected output or Parked, got {other:?}"),
        }
    }
}

/// Kept sessions are the snapshot path: parked by `Quiesce` (nothing
/// follows `Parked` until `Resume`), and surviving a lost connection to
/// be attached to on another, with no output lost or repeated. One test,
/// because `Quiesce` parks every kept session of the (shared) agent.
#[test]
fn kept_sessions_park_for_a_snapshot_and_survive_their_connection() {
    // Two seconds at least: long enough that `Quiesce` always finds it running.
    let count = "i=0; while [ $i -lt 40 ]; do echo $i; i=$((i+1)); sleep 0.05; done";
    let expected: String = (0..40).map(|i| format!("{i}\n")).collect();

    // Parked, then resumed on the same connection.
    let mut session = connect();
    let mut req = exec_req(&["sh", "-c", count]);
    req.keep = true;
    start(&mut session, req.clone());
    let mut out = Vec::new();
    let mut control = connect();
    assert_eq!(request(&mut control, Request::Quiesce), AgentMessage::Ok);
    read_until_parked(&mut session, &mut out);
    session
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        session.read(&mut byte).is_err(),
        "a parked session sent more output"
    );
    session
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(request(&mut control, Request::Resume), AgentMessage::Ok);
    let rest = collect(&mut session);
    out.extend(rest.stdout);
    assert_eq!(String::from_utf8_lossy(&out), expected);
    assert_eq!(rest.exit.unwrap().code, Some(0));
    ping_ok(&mut session);

    // Parked, the connection lost (as a restore resets it), attached on a
    // new one.
    let mut first = connect();
    let pid = start(&mut first, req);
    assert_eq!(request(&mut control, Request::Quiesce), AgentMessage::Ok);
    let mut out = Vec::new();
    read_until_parked(&mut first, &mut out);
    drop(first);
    std::thread::sleep(Duration::from_millis(100));
    let mut second = connect();
    assert_eq!(
        request(&mut second, Request::Attach { pid }),
        AgentMessage::Started { pid }
    );
    let rest = collect(&mut second);
    out.extend(rest.stdout);
    assert_eq!(String::from_utf8_lossy(&out), expected);
    assert_eq!(rest.exit.unwrap().code, Some(0));
    ping_ok(&mut second);
    // Acknowledged: the session is gone from the table.
    match request(&mut second, Request::Attach { pid }) {
        AgentMessage::Error(e) => assert_eq!(e.kind, ErrorKind::NotFound),
        other => panic!("expected NotFound, got {other:?}"),
    }

    // Lost without parking, while the process writes: it waits for the
    // attach, then everything it wrote arrives; its exit too, when it
    // ended meanwhile.
    let mut first = connect();
    let mut req = exec_req(&["sh", "-c", "echo a; sleep 0.2; echo b; exit 5"]);
    req.keep = true;
    let pid = start(&mut first, req);
    drop(first);
    std::thread::sleep(Duration::from_millis(500));
    let mut second = connect();
    assert_eq!(
        request(&mut second, Request::Attach { pid }),
        AgentMessage::Started { pid }
    );
    let c = collect(&mut second);
    assert_eq!(c.exit.unwrap().code, Some(5));
    // What the first connection delivered before it was dropped is not
    // sent twice, what it could not deliver is sent now: "a" either went
    // out before the drop or comes here, "b" always comes here.
    let text = String::from_utf8_lossy(&c.stdout).into_owned();
    assert!(text == "a\nb\n" || text == "b\n", "{text:?}");
}
