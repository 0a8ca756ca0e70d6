//! The guest half of the tier-3 vsock test: serves `CONNECTIONS` host
//! connections on `GUEST_PORT` while opening as many to the host's
//! `HOST_PORT`, all at once. Prints `VSOCK-GUEST-OK` when every exchange
//! checked out.

#[path = "../exchange.rs"]
mod exchange;

use std::net::Shutdown;
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use exchange::{CONNECTIONS, GUEST_PORT, HOST_PORT};
use vsock::{VMADDR_CID_ANY, VMADDR_CID_HOST, VsockListener, VsockStream};

fn main() -> ExitCode {
    let expected = 2 * CONNECTIONS;
    let listener = match VsockListener::bind_with_cid_port(VMADDR_CID_ANY, GUEST_PORT) {
        Ok(l) => l,
        Err(e) => {
            println!("VSOCK-GUEST-FAIL listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let server_tx = tx.clone();
    thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let tx = server_tx.clone();
            match listener.accept() {
                Ok((s, _)) => {
                    thread::spawn(move || {
                        let _ = tx.send(exchange::serve(s).map_err(|e| format!("serve: {e}")));
                    });
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("accept: {e}")));
                }
            }
        }
    });
    for i in 0..CONNECTIONS {
        let tx = tx.clone();
        thread::spawn(move || {
            let result = VsockStream::connect_with_cid_port(VMADDR_CID_HOST, HOST_PORT)
                .map_err(|e| format!("connect {i}: {e}"))
                .and_then(|s| exchange::exchange(s, i as u64, |s| s.shutdown(Shutdown::Write)));
            let _ = tx.send(result);
        });
    }
    let mut failures = 0;
    for done in 1..=expected {
        match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(Ok(())) => {
                if done % 16 == 0 {
                    println!("VSOCK-GUEST-PROGRESS {done}");
                }
            }
            Ok(Err(e)) => {
                failures += 1;
                println!("VSOCK-GUEST-FAIL {e}");
            }
            Err(_) => {
                println!("VSOCK-GUEST-FAIL timed out");
                return ExitCode::FAILURE;
            }
        }
    }
    if failures == 0 {
        println!("VSOCK-GUEST-OK");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
