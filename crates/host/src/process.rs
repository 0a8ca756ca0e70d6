//! Whether another process is still there, by its id, and which one it
//! is (ids are reused).

/// Whether a process with id `pid` exists now. (It may be a newer process
/// that was given the same id: callers use this only to tell leftovers of
/// a dead process from a live one's.)
pub fn process_exists(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    sys::process_exists(pid)
}

/// When process `pid` started, as an opaque stamp: a process that later
/// gets the same id has another. `None` when there is no such process.
/// (Linux: field 22 of `/proc/PID/stat`, in clock ticks since boot; macOS:
/// `proc_pidinfo`'s start time; Windows: the creation time.)
pub fn process_start(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    sys::process_start(pid)
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

    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub(super) fn process_start(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces; fields after it do not.
        let after = stat.get(stat.rfind(')')? + 2..)?;
        after.split(' ').nth(19)?.parse().ok()
    }

    #[cfg(target_vendor = "apple")]
    pub(super) fn process_start(pid: u32) -> Option<u64> {
        let pid = i32::try_from(pid).ok()?;
        // SAFETY: proc_bsdinfo is plain integers and arrays: all zeroes is
        // a valid value.
        let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::proc_bsdinfo>() as i32;
        // SAFETY: the buffer is one proc_bsdinfo, and its size is passed.
        let written = unsafe {
            libc::proc_pidinfo(pid, libc::PROC_PIDTBSDINFO, 0, (&raw mut info).cast(), size)
        };
        (written == size).then(|| info.pbi_start_tvsec * 1_000_000 + info.pbi_start_tvusec)
    }

    #[cfg(not(any(target_os = "linux", target_os = "android", target_vendor = "apple")))]
    pub(super) fn process_start(_pid: u32) -> Option<u64> {
        None
    }
}

#[cfg(windows)]
mod sys {
    use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};

    use windows_sys::Win32::Foundation::{
        ERROR_ACCESS_DENIED, FILETIME, GetLastError, STILL_ACTIVE,
    };
    use windows_sys::Win32::System::Threading::{
        GetExitCodeProcess, GetProcessTimes, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
    };

    /// Process `pid`, opened to be asked about; the error code when it
    /// cannot be.
    fn open(pid: u32) -> Result<OwnedHandle, u32> {
        // SAFETY: no pointers; a null result is checked.
        let raw = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
        if raw.is_null() {
            // SAFETY: reads this thread's last error; no inputs.
            return Err(unsafe { GetLastError() });
        }
        // SAFETY: a handle just opened, which nothing else owns.
        Ok(unsafe { OwnedHandle::from_raw_handle(raw) })
    }

    /// Whether the opened process has not exited (a handle keeps an
    /// exited process's id from being reused).
    fn still_running(process: &OwnedHandle) -> bool {
        let mut code = 0u32;
        // SAFETY: an open process handle and a valid out pointer.
        let ok = unsafe { GetExitCodeProcess(process.as_raw_handle(), &mut code) };
        ok != 0 && code == STILL_ACTIVE as u32
    }

    pub(super) fn process_start(pid: u32) -> Option<u64> {
        let process = open(pid).ok()?;
        let mut times = [FILETIME {
            dwLowDateTime: 0,
            dwHighDateTime: 0,
        }; 4];
        let [created, exited, kernel, user] = &mut times;
        // SAFETY: an open process handle and four valid out pointers.
        let ok = unsafe { GetProcessTimes(process.as_raw_handle(), created, exited, kernel, user) };
        (ok != 0 && still_running(&process))
            .then(|| u64::from(times[0].dwHighDateTime) << 32 | u64::from(times[0].dwLowDateTime))
    }

    pub(super) fn process_exists(pid: u32) -> bool {
        match open(pid) {
            Ok(process) => still_running(&process),
            // Someone else's, but there.
            Err(code) => code == ERROR_ACCESS_DENIED,
        }
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
        assert_eq!(process_start(pid), None);
    }

    #[test]
    fn a_process_keeps_its_start_stamp() {
        let me = process_start(std::process::id());
        assert!(me.is_some());
        assert_eq!(process_start(std::process::id()), me);
        assert_eq!(process_start(0), None);
    }
}
