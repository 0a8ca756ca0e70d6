//! A disk image's blocks: giving them back to the host filesystem, or
//! zeroing them without writing.

use std::fs::File;
use std::io;

/// Makes `len` bytes at `offset` read as zeroes and deallocates them,
/// keeping the file's size. On Windows they are deallocated only in a
/// sparse file.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::FallocateFlags;
        rustix::fs::fallocate(
            file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )?;
        Ok(())
    }
    #[cfg(target_vendor = "apple")]
    {
        apple::punch_hole(file, offset, len)
    }
    #[cfg(windows)]
    {
        windows::set_zero_data(file, offset, len)
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_vendor = "apple",
        windows
    )))]
    {
        let _ = (file, offset, len);
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Makes `len` bytes at `offset` read as zeroes, keeping them allocated
/// where the filesystem can. Where it cannot, `Unsupported`: the caller
/// writes zeroes.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::FallocateFlags;
        rustix::fs::fallocate(
            file,
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )?;
        Ok(())
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = (file, offset, len);
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[cfg(target_vendor = "apple")]
mod apple {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    /// `struct fpunchhole` of `<sys/fcntl.h>`.
    #[repr(C)]
    struct PunchHole {
        flags: u32,
        reserved: u32,
        offset: i64,
        length: i64,
    }

    /// `F_PUNCHHOLE` of `<sys/fcntl.h>`.
    const F_PUNCHHOLE: i32 = 99;

    pub(super) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(offset), Ok(length)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        let args = PunchHole {
            flags: 0,
            reserved: 0,
            offset,
            length,
        };
        // SAFETY: F_PUNCHHOLE reads one `struct fpunchhole` through the
        // pointer, which is valid for the call.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), F_PUNCHHOLE, &args as *const PunchHole) };
        if rc == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

#[cfg(windows)]
mod windows {
    use std::fs::File;
    use std::io;
    use std::os::windows::io::AsRawHandle;

    use windows_sys::Win32::Foundation::{ERROR_INVALID_FUNCTION, ERROR_NOT_SUPPORTED};
    use windows_sys::Win32::System::IO::DeviceIoControl;
    use windows_sys::Win32::System::Ioctl::{FILE_ZERO_DATA_INFORMATION, FSCTL_SET_ZERO_DATA};

    /// `FSCTL_SET_ZERO_DATA`: the range reads as zeroes after; NTFS
    /// deallocates it only in a sparse file and writes zeroes otherwise.
    pub(super) fn set_zero_data(file: &File, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .and_then(|end| i64::try_from(end).ok())
            .ok_or(io::ErrorKind::InvalidInput)?;
        let range = FILE_ZERO_DATA_INFORMATION {
            FileOffset: offset as i64,
            BeyondFinalZero: end,
        };
        let mut returned = 0u32;
        // SAFETY: the handle is open for the call; the input buffer is one
        // FILE_ZERO_DATA_INFORMATION that outlives it, there is no output
        // buffer, and the call is synchronous (no OVERLAPPED).
        let ok = unsafe {
            DeviceIoControl(
                file.as_raw_handle(),
                FSCTL_SET_ZERO_DATA,
                (&raw const range).cast(),
                std::mem::size_of::<FILE_ZERO_DATA_INFORMATION>() as u32,
                std::ptr::null_mut(),
                0,
                &mut returned,
                std::ptr::null_mut(),
            )
        };
        if ok != 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        // FAT and exFAT answer ERROR_INVALID_FUNCTION, Wine
        // ERROR_NOT_SUPPORTED: both mean the caller should write zeroes.
        match error.raw_os_error().map(|code| code as u32) {
            Some(ERROR_INVALID_FUNCTION | ERROR_NOT_SUPPORTED) => {
                Err(io::ErrorKind::Unsupported.into())
            }
            _ => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn punched_and_zeroed_ranges_read_as_zeroes_and_keep_the_size() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0xaa; 1 << 20]).unwrap();
        let done = |what: &str, result: io::Result<()>| match result {
            Ok(()) => true,
            // A filesystem without the operation: the caller falls back.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => false,
            Err(e) if e.raw_os_error() == Some(95) => false, // EOPNOTSUPP
            Err(e) => panic!("{what}: {e}"),
        };
        let punched = done("punch", punch_hole(&file, 4096, 8192));
        let zeroed = done("zero", zero_range(&file, 65536, 4096));
        assert_eq!(file.metadata().unwrap().len(), 1 << 20);
        let mut data = vec![0u8; 1 << 20];
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_exact(&mut data).unwrap();
        if punched {
            assert!(data[4096..12288].iter().all(|&b| b == 0));
        }
        if zeroed {
            assert!(data[65536..69632].iter().all(|&b| b == 0));
        }
        // Only the ranges asked for changed.
        assert_eq!(data[4095], 0xaa);
        assert_eq!(data[12288], 0xaa);
        assert_eq!(data[69632], 0xaa);
    }
}
