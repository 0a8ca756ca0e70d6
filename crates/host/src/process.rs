//! Whether another process is still there, by its id.

/// Whether a process with id `pid` exists now. (It may be a newer process
/// that was given the same id: callers use this only to tell leftovers of
/// a dead process from a live one's.)
pub fn process_exists(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    sys::process_exists(pid)
}

#[cfg(unix)]
mod sys {
    use rustix::io::Errno;
    use rustix::process::{Pid, test_kill_process};

    pub(super) fn process_exists(pid: u32) -> bool {
        let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
            return false;
        };
        // Signal 0 checks without sending; EPERM means it is someone
        // else's, but there.
        matches!(test_kill_process(pid), Ok(()) | Err(Errno::PERM))
    }
}

#[cfg(windows)]
mod sys {
    use windows_sys::Win32::Foundation::{
        CloseHandle, ERROR_ACCESS_DENIED, GetLastError, STILL_ACTIVE,
    };
    use windows_sys::Win32::System::Threading::{
        GetExitCodeProcess, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
    };

    pub(super) fn process_exists(pid: u32) -> bool {
        // SAFETY: no pointers; a null result is checked.
        let handle = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
        if handle.is_null() {
            // SAFETY: reads this thread's last error; no inputs.
            return unsafe { GetLastError() } == ERROR_ACCESS_DENIED;
        }
        let mut code = 0u32;
        // SAFETY: a process handle just opened, and a valid out pointer.
        let ok = unsafe { GetExitCodeProcess(handle, &mut code) };
        // SAFETY: closes the handle opened above, once.
        unsafe { CloseHandle(handle) };
        ok != 0 && code == STILL_ACTIVE as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_exists_and_a_reaped_child_does_not() {
        assert!(process_exists(std::process::id()));
        assert!(!process_exists(0));
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .arg("--list")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_exists(pid), "{pid}");
    }
}
