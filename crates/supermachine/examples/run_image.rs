//! Runs an image's own command in a microVM, publishing a guest port on
//! the host while it runs, and exits with the command's status:
//!
//! `cargo run --example run_image -- IMAGE [GUEST_PORT]`
//!
//! The image is taken from the store, or pulled, or loaded when IMAGE is
//! a path to an archive or OCI layout.

use std::net::TcpListener;
use std::process::ExitCode;

use supermachine::images::{Overrides, PullOptions};
use supermachine::{Image, VmConfig};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(name) = args.next() else {
        eprintln!("usage: run_image IMAGE [GUEST_PORT]");
        return ExitCode::from(2);
    };
    let port = args.next().map(|p| p.parse::<u16>());
    match run(&name, port) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)),
        Err(e) => {
            eprintln!("run_image: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    name: &str,
    port: Option<Result<u16, std::num::ParseIntError>>,
) -> Result<i32, Box<dyn std::error::Error>> {
    let image = Image::resolve(name, &PullOptions::default())?;
    let command = image.command(&Overrides::default())?;
    let vm = image.start(&VmConfig::default())?;
    let _forward = match port {
        Some(port) => {
            let port = port?;
            let listener = TcpListener::bind(("127.0.0.1", 0))?;
            let forward = vm.forward_port(listener, port)?;
            eprintln!("guest port {port} is at {}", forward.local_addr());
            Some(forward)
        }
        None => None,
    };
    let out = vm.exec_spec(&command).output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    vm.stop()?;
    Ok(out.status.shell_code())
}
