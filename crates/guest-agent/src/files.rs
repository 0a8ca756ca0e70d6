//! `WriteFile` and `ReadFile`: files of any size, streamed in chunks.
//!
//! A written file appears whole or not at all: the chunks go to a
//! temporary file beside it, which gets its mode and owner and is renamed
//! over the path only after the last chunk. When writing fails midway the
//! remaining chunks are still read (and dropped), so the connection stays
//! in step and can serve the next request.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use supermachine_agent_protocol::{
    self as proto, AgentError, AgentMessage, CHUNK, ErrorKind, HostMessage, WriteFileRequest,
};

use crate::os_error;

/// How a write request's stream ended.
#[derive(Debug)]
pub enum Received {
    /// The file is in place.
    Complete,
    /// Every chunk was read, but the file could not be written.
    Failed(AgentError),
}

fn invalid(message: String) -> AgentError {
    AgentError {
        kind: ErrorKind::InvalidRequest,
        message,
    }
}

/// Checks that a path from the host is absolute and names a file.
fn checked_path(path: &str) -> Result<&Path, AgentError> {
    let p = Path::new(path);
    if !p.is_absolute() || p.file_name().is_none() {
        return Err(invalid(format!("{path:?} is not an absolute file path")));
    }
    Ok(p)
}

/// A temporary file beside the destination, removed unless renamed.
struct Staged {
    path: PathBuf,
    file: File,
    done: bool,
}

impl Staged {
    fn create(dest: &Path, mode: u32) -> io::Result<Self> {
        let parent = dest.parent().unwrap_or(Path::new("/"));
        let name = dest.file_name().unwrap_or_default().to_string_lossy();
        let mut n = 0u32;
        loop {
            let path = parent.join(format!(".{name}.sm-{}-{n}", std::process::id()));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & 0o7777)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(Self {
                        path,
                        file,
                        done: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Receives a file. `Err` only when the connection itself failed or went
/// out of step.
pub fn write<S: Read>(req: &WriteFileRequest, conn: &mut S) -> Result<Received, proto::Error> {
    let mut staged: Result<Staged, AgentError> = checked_path(&req.path).and_then(|dest| {
        if req.create_parents
            && let Some(parent) = dest.parent()
        {
            fs::create_dir_all(parent)
                .map_err(|e| os_error(&format!("creating {}", parent.display()), &e))?;
        }
        Staged::create(dest, req.mode).map_err(|e| os_error(&format!("writing {}", req.path), &e))
    });
    let mut payload = Vec::new();
    loop {
        if !proto::read_payload_into(conn, &mut payload)? {
            return Err(proto::Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the host closed the connection inside a file",
            )));
        }
        let message = proto::decode::<HostMessage>(&payload)?;
        match message {
            HostMessage::FileChunk(bytes) => {
                if let Ok(s) = &mut staged
                    && let Err(e) = s.file.write_all(&bytes)
                {
                    staged = Err(os_error(&format!("writing {}", req.path), &e));
                }
            }
            HostMessage::FileEnd => break,
            other => {
                return Ok(Received::Failed(AgentError {
                    kind: ErrorKind::Protocol,
                    message: format!("expected a file chunk, got {}", other.name()),
                }));
            }
        }
    }
    let mut staged = match staged {
        Ok(s) => s,
        Err(e) => return Ok(Received::Failed(e)),
    };
    let finish = || -> io::Result<()> {
        // The mode again: the process umask narrowed the one given to open.
        staged
            .file
            .set_permissions(fs::Permissions::from_mode(req.mode & 0o7777))?;
        std::os::unix::fs::fchown(&staged.file, Some(req.uid), Some(req.gid))?;
        if req.mode & 0o6000 != 0 {
            // chown clears set-id bits.
            staged
                .file
                .set_permissions(fs::Permissions::from_mode(req.mode & 0o7777))?;
        }
        staged.file.sync_data()?;
        fs::rename(&staged.path, &req.path)
    };
    match finish() {
        Ok(()) => {
            staged.done = true;
            Ok(Received::Complete)
        }
        Err(e) => Ok(Received::Failed(os_error(
            &format!("writing {}", req.path),
            &e,
        ))),
    }
}

/// Sends a file: its attributes, its chunks, the end. A failure before
/// the first chunk is an error answer; one after it also ends the
/// stream with an error answer (the host stops reading chunks there).
pub fn read<S: Write>(path: &str, conn: &mut S) -> Result<(), proto::Error> {
    let opened = checked_path(path).and_then(|p| {
        let file = File::open(p).map_err(|e| os_error(&format!("reading {path}"), &e))?;
        let meta = file
            .metadata()
            .map_err(|e| os_error(&format!("reading {path}"), &e))?;
        if meta.is_dir() {
            return Err(invalid(format!("{path} is a directory")));
        }
        Ok((file, meta))
    });
    let (mut file, meta) = match opened {
        Ok(x) => x,
        Err(e) => return proto::write_frame(conn, &AgentMessage::Error(e)),
    };
    proto::write_frame(
        conn,
        &AgentMessage::FileInfo {
            size: meta.len(),
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
        },
    )?;
    // One data buffer and one frame buffer for the whole file.
    let mut data = Vec::with_capacity(CHUNK);
    let mut frame = Vec::new();
    loop {
        data.resize(CHUNK, 0);
        match file.read(&mut data) {
            Ok(0) => return proto::write_frame(conn, &AgentMessage::FileEnd),
            Ok(n) => {
                data.truncate(n);
                let message = AgentMessage::FileChunk(data);
                frame = proto::encode_frame_into(&message, frame)?;
                conn.write_all(&frame)?;
                data = crate::exec::into_data(message);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return proto::write_frame(
                    conn,
                    &AgentMessage::Error(os_error(&format!("reading {path}"), &e)),
                );
            }
        }
    }
}
