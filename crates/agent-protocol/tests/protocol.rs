//! Every message survives a frame round trip; malformed frames and a
//! version mismatch are clear errors.

#![allow(clippy::unwrap_used)]

use std::io::Cursor;

use supermachine_agent_protocol::*;

fn host_messages() -> Vec<HostMessage> {
    let exec = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
        env: vec!["A=1".into(), "PATH=/bin".into()],
        cwd: Some("/tmp".into()),
        user: Some(User::Ids {
            uid: 1000,
            gid: 1000,
            groups: vec![10, 20],
        }),
        stdin: true,
        tty: Some(WindowSize { rows: 24, cols: 80 }),
        timeout_ms: Some(1500),
        keep: false,
    };
    let requests = vec![
        Request::Ping,
        Request::Exec(exec.clone()),
        Request::Exec(ExecRequest {
            user: Some(User::Spec("app:staff".into())),
            tty: None,
            timeout_ms: None,
            keep: false,
            cwd: None,
            ..exec
        }),
        Request::WriteFile(WriteFileRequest {
            path: "/etc/x".into(),
            mode: 0o640,
            uid: 1,
            gid: 2,
            create_parents: true,
        }),
        Request::ReadFile {
            path: "/etc/passwd".into(),
        },
        Request::Connect { port: 8080 },
        Request::SetClock(Clock {
            secs: 1_700_000_000,
            nanos: 999_999_999,
        }),
        Request::AddEntropy(vec![7; 64]),
        Request::Signal {
            pid: 42,
            signal: 15,
            group: true,
        },
        Request::Shutdown { grace_ms: 2000 },
        Request::Quiesce,
        Request::Resume,
        Request::Attach { pid: 9 },
        Request::Restored(Restored {
            clock: Clock::now(),
            entropy: vec![5; 64],
            hostname: Some("web-1".into()),
            env: vec!["REPLICA=1".into()],
        }),
    ];
    let mut all: Vec<HostMessage> = requests.into_iter().map(HostMessage::Request).collect();
    all.extend([
        HostMessage::Welcome {
            clock: Clock::now(),
            entropy: vec![1, 2, 3],
        },
        HostMessage::Stdin(vec![0xff; CHUNK]),
        HostMessage::CloseStdin,
        HostMessage::Resize(WindowSize {
            rows: 50,
            cols: 132,
        }),
        HostMessage::Signal {
            signal: 9,
            group: false,
        },
        HostMessage::FileChunk(b"contents".to_vec()),
        HostMessage::FileEnd,
        HostMessage::Done,
    ]);
    all
}

fn agent_messages() -> Vec<AgentMessage> {
    vec![
        AgentMessage::Hello {
            agent_version: "0.1.0".into(),
            kernel_boot_us: 123_456,
            setup_us: 7_890,
        },
        AgentMessage::Ok,
        AgentMessage::Error(AgentError {
            kind: ErrorKind::NotFound,
            message: "no such file".into(),
        }),
        AgentMessage::Started { pid: 77 },
        AgentMessage::Stdout(vec![b'a'; CHUNK]),
        AgentMessage::Stderr(vec![]),
        AgentMessage::StdinConsumed(STDIN_WINDOW),
        AgentMessage::Exit(ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: true,
            peak_rss_kib: 1234,
        }),
        AgentMessage::FileInfo {
            size: u64::MAX,
            mode: 0o100644,
            uid: 0,
            gid: 0,
        },
        AgentMessage::FileChunk(vec![0; 3]),
        AgentMessage::FileEnd,
        AgentMessage::Parked,
    ]
}

/// Which variant a message is, by an exhaustive match: adding a variant
/// without adding it to the lists above fails this test's build or its
/// coverage check.
fn host_variant(m: &HostMessage) -> usize {
    match m {
        HostMessage::Request(r) => match r {
            Request::Ping => 0,
            Request::Exec(_) => 1,
            Request::WriteFile(_) => 2,
            Request::ReadFile { .. } => 3,
            Request::Connect { .. } => 4,
            Request::SetClock(_) => 5,
            Request::AddEntropy(_) => 6,
            Request::Signal { .. } => 7,
            Request::Shutdown { .. } => 8,
            Request::Quiesce => 17,
            Request::Resume => 18,
            Request::Attach { .. } => 19,
            Request::Restored(_) => 20,
        },
        HostMessage::Welcome { .. } => 9,
        HostMessage::Stdin(_) => 10,
        HostMessage::CloseStdin => 11,
        HostMessage::Resize(_) => 12,
        HostMessage::Signal { .. } => 13,
        HostMessage::FileChunk(_) => 14,
        HostMessage::FileEnd => 15,
        HostMessage::Done => 16,
    }
}

fn agent_variant(m: &AgentMessage) -> usize {
    match m {
        AgentMessage::Hello { .. } => 0,
        AgentMessage::Ok => 1,
        AgentMessage::Error(_) => 2,
        AgentMessage::Started { .. } => 3,
        AgentMessage::Stdout(_) => 4,
        AgentMessage::Stderr(_) => 5,
        AgentMessage::StdinConsumed(_) => 6,
        AgentMessage::Exit(_) => 7,
        AgentMessage::FileInfo { .. } => 8,
        AgentMessage::FileChunk(_) => 9,
        AgentMessage::FileEnd => 10,
        AgentMessage::Parked => 11,
    }
}

#[test]
fn every_message_round_trips_through_one_stream() {
    let hosts = host_messages();
    let agents = agent_messages();
    let mut seen: Vec<usize> = hosts.iter().map(host_variant).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        (0..=20).collect::<Vec<_>>(),
        "a host message is not covered"
    );
    let mut seen: Vec<usize> = agents.iter().map(agent_variant).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        (0..=11).collect::<Vec<_>>(),
        "an agent message is not covered"
    );

    let mut stream = Vec::new();
    send_handshake(&mut stream).unwrap();
    for m in &hosts {
        write_frame(&mut stream, m).unwrap();
    }
    let mut r = Cursor::new(stream);
    expect_handshake(&mut r).unwrap();
    for m in &hosts {
        let back: HostMessage = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(&back, m);
    }
    assert!(read_frame::<_, HostMessage>(&mut r).unwrap().is_none());

    let mut stream = Vec::new();
    for m in &agents {
        write_frame(&mut stream, m).unwrap();
    }
    let mut r = Cursor::new(stream);
    for m in &agents {
        let back: AgentMessage = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(&back, m);
    }
}

#[test]
fn data_chunks_cost_little_more_than_their_bytes() {
    for m in [
        AgentMessage::Stdout(vec![0; CHUNK]),
        AgentMessage::Stderr(vec![0; CHUNK]),
        AgentMessage::FileChunk(vec![0; CHUNK]),
    ] {
        let frame = encode_frame(&m).unwrap();
        assert!(frame.len() <= CHUNK + 8, "{} bytes", frame.len());
        // One vsock packet carries a whole frame.
        assert!(frame.len() <= 64 << 10, "{} bytes", frame.len());
    }
    for m in [
        HostMessage::Stdin(vec![0; CHUNK]),
        HostMessage::FileChunk(vec![0; CHUNK]),
    ] {
        assert!(encode_frame(&m).unwrap().len() <= 64 << 10);
    }
}

#[test]
fn truncated_frames_are_errors_naming_what_arrived() {
    let frame = encode_frame(&HostMessage::Request(Request::Ping)).unwrap();
    for cut in 1..frame.len() {
        let err = read_frame::<_, HostMessage>(&mut Cursor::new(&frame[..cut])).unwrap_err();
        assert!(
            matches!(err, Error::Truncated { .. }),
            "cut at {cut}: {err}"
        );
        assert!(!err.stream_intact());
        assert!(err.to_string().contains("connection ended inside a frame"));
    }
}

#[test]
fn oversized_frames_are_refused_before_reading_them() {
    let mut bytes = (MAX_FRAME + 1).to_le_bytes().to_vec();
    bytes.extend([0u8; 16]);
    let err = read_frame::<_, HostMessage>(&mut Cursor::new(bytes)).unwrap_err();
    assert!(matches!(err, Error::FrameTooLarge(n) if n == MAX_FRAME + 1));
    assert_eq!(
        err.to_string(),
        format!(
            "frame of {} bytes is larger than the {MAX_FRAME}-byte limit",
            MAX_FRAME + 1
        )
    );
    // Nor can one be sent.
    let err = encode_frame(&HostMessage::Stdin(vec![0; MAX_FRAME as usize])).unwrap_err();
    assert!(matches!(err, Error::Encode(_)));
}

#[test]
fn unknown_messages_leave_the_stream_in_step() {
    // A variant index no version has, then a valid frame.
    let mut stream = vec![1, 0, 0, 0, 0x7f];
    write_frame(&mut stream, &HostMessage::Request(Request::Ping)).unwrap();
    // A valid message with junk after it.
    let mut long = encode_frame(&HostMessage::Done).unwrap();
    long.push(0);
    long[0] += 1;
    stream.extend(long);
    let mut r = Cursor::new(stream);
    let err = read_frame::<_, HostMessage>(&mut r).unwrap_err();
    assert!(err.stream_intact() && err.to_string().starts_with("undecodable message"));
    assert_eq!(
        read_frame::<_, HostMessage>(&mut r).unwrap(),
        Some(HostMessage::Request(Request::Ping))
    );
    let err = read_frame::<_, HostMessage>(&mut r).unwrap_err();
    assert_eq!(
        err.to_string(),
        "undecodable message: 1 bytes after the message"
    );
}

#[test]
fn a_version_mismatch_names_both_versions() {
    let mut stream = Vec::new();
    write_frame(
        &mut stream,
        &Handshake {
            magic: MAGIC,
            version: PROTOCOL_VERSION + 1,
        },
    )
    .unwrap();
    let err = expect_handshake(&mut Cursor::new(stream)).unwrap_err();
    assert!(
        matches!(err, Error::VersionMismatch { ours, theirs } if ours == PROTOCOL_VERSION && theirs == PROTOCOL_VERSION + 1)
    );
    assert!(err.to_string().contains(&format!(
        "this side speaks version {PROTOCOL_VERSION}, the peer version {}",
        PROTOCOL_VERSION + 1
    )));

    let mut stream = Vec::new();
    write_frame(
        &mut stream,
        &Handshake {
            magic: 0x4854_5450,
            version: 1,
        },
    )
    .unwrap();
    let err = expect_handshake(&mut Cursor::new(stream)).unwrap_err();
    assert!(matches!(err, Error::BadMagic(0x4854_5450)));

    let err = expect_handshake(&mut Cursor::new(Vec::new())).unwrap_err();
    assert!(
        err.to_string()
            .contains("closed the connection before its handshake")
    );
}
