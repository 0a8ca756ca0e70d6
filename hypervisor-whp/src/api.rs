//! WHP's functions, found when first called instead of imported.
//! `WinHvPlatform.dll` and `WinHvEmulation.dll` are there only where the
//! "Windows Hypervisor Platform" feature is turned on; a program that
//! imported them would not start at all elsewhere, not even to say so or
//! to pull an image. Each function below has the C signature
//! `windows-sys` declares for it, and is looked up in its DLL (from
//! System32 only) once.

#![allow(non_snake_case)]

use std::ffi::c_void;
use std::sync::OnceLock;

use windows_sys::Win32::Foundation::{ERROR_MOD_NOT_FOUND, ERROR_PROC_NOT_FOUND, HMODULE};
use windows_sys::Win32::System::Hypervisor::*;
use windows_sys::Win32::System::LibraryLoader::{
    GetProcAddress, LOAD_LIBRARY_SEARCH_SYSTEM32, LoadLibraryExW,
};
use windows_sys::core::HRESULT;

/// The platform's DLLs.
#[derive(Clone, Copy, Debug)]
enum Dll {
    Platform,
    Emulation,
}

impl Dll {
    fn name(self) -> &'static str {
        match self {
            Dll::Platform => "WinHvPlatform.dll",
            Dll::Emulation => "WinHvEmulation.dll",
        }
    }

    /// The loaded module (as an address), once per process.
    fn module(self) -> Option<usize> {
        static PLATFORM: OnceLock<Option<usize>> = OnceLock::new();
        static EMULATION: OnceLock<Option<usize>> = OnceLock::new();
        let cell = match self {
            Dll::Platform => &PLATFORM,
            Dll::Emulation => &EMULATION,
        };
        *cell.get_or_init(|| {
            let wide: Vec<u16> = self.name().encode_utf16().chain([0]).collect();
            // SAFETY: a NUL-terminated UTF-16 name, no file handle, and a
            // flag restricting the search to System32; a null result is
            // checked. The module stays loaded for the process's life.
            let module: HMODULE = unsafe {
                LoadLibraryExW(
                    wide.as_ptr(),
                    std::ptr::null_mut(),
                    LOAD_LIBRARY_SEARCH_SYSTEM32,
                )
            };
            (!module.is_null()).then_some(module as usize)
        })
    }
}

/// Why WHP cannot be used here, if it cannot: a DLL or a function this
/// backend needs is missing.
pub(crate) fn missing() -> Option<String> {
    for dll in [Dll::Platform, Dll::Emulation] {
        if dll.module().is_none() {
            return Some(format!("{} is not installed", dll.name()));
        }
    }
    None
}

/// The HRESULT a call answers when its function cannot be found
/// (`HRESULT_FROM_WIN32`).
const fn not_found(error: u32) -> HRESULT {
    (0x8007_0000 | (error & 0xffff)) as HRESULT
}

/// `name` (NUL-terminated) in `dll`, as an address.
fn lookup(dll: Dll, name: &'static str) -> Result<usize, HRESULT> {
    let module = dll.module().ok_or(not_found(ERROR_MOD_NOT_FOUND))?;
    // SAFETY: a module loaded above and never unloaded, and a
    // NUL-terminated ASCII name; a missing function is `None`.
    let function = unsafe { GetProcAddress(module as HMODULE, name.as_ptr()) };
    function
        .map(|f| f as usize)
        .ok_or(not_found(ERROR_PROC_NOT_FOUND))
}

/// Declares each function as a wrapper that looks it up once and calls
/// it, or answers the not-found HRESULT.
macro_rules! dynamic {
    ($dll:expr => $( fn $name:ident($($arg:ident: $ty:ty),* $(,)?); )*) => {$(
        pub(crate) unsafe fn $name($($arg: $ty),*) -> HRESULT {
            static ADDRESS: OnceLock<Result<usize, HRESULT>> = OnceLock::new();
            let address = match *ADDRESS.get_or_init(|| lookup($dll, concat!(stringify!($name), "\0"))) {
                Ok(address) => address,
                Err(hresult) => return hresult,
            };
            // SAFETY: the address is the DLL's export of this name, whose
            // C signature is the one declared here (Microsoft's, as
            // windows-sys declares it).
            let function = unsafe {
                std::mem::transmute::<usize, unsafe extern "system" fn($($ty),*) -> HRESULT>(address)
            };
            // SAFETY: the caller upholds the function's own contract.
            unsafe { function($($arg),*) }
        }
    )*};
}

dynamic! { Dll::Platform =>
    fn WHvGetCapability(code: WHV_CAPABILITY_CODE, buffer: *mut c_void, size: u32, written: *mut u32);
    fn WHvCreatePartition(partition: *mut WHV_PARTITION_HANDLE);
    fn WHvSetupPartition(partition: WHV_PARTITION_HANDLE);
    fn WHvDeletePartition(partition: WHV_PARTITION_HANDLE);
    fn WHvSetPartitionProperty(
        partition: WHV_PARTITION_HANDLE,
        code: WHV_PARTITION_PROPERTY_CODE,
        buffer: *const c_void,
        size: u32,
    );
    fn WHvMapGpaRange(
        partition: WHV_PARTITION_HANDLE,
        source: *const c_void,
        guest: u64,
        size: u64,
        flags: WHV_MAP_GPA_RANGE_FLAGS,
    );
    fn WHvCreateVirtualProcessor(partition: WHV_PARTITION_HANDLE, index: u32, flags: u32);
    fn WHvDeleteVirtualProcessor(partition: WHV_PARTITION_HANDLE, index: u32);
    fn WHvRunVirtualProcessor(
        partition: WHV_PARTITION_HANDLE,
        index: u32,
        exit: *mut c_void,
        size: u32,
    );
    fn WHvCancelRunVirtualProcessor(partition: WHV_PARTITION_HANDLE, index: u32, flags: u32);
    fn WHvGetVirtualProcessorRegisters(
        partition: WHV_PARTITION_HANDLE,
        index: u32,
        names: *const WHV_REGISTER_NAME,
        count: u32,
        values: *mut WHV_REGISTER_VALUE,
    );
    fn WHvSetVirtualProcessorRegisters(
        partition: WHV_PARTITION_HANDLE,
        index: u32,
        names: *const WHV_REGISTER_NAME,
        count: u32,
        values: *const WHV_REGISTER_VALUE,
    );
    fn WHvGetVirtualProcessorXsaveState(
        partition: WHV_PARTITION_HANDLE,
        index: u32,
        buffer: *mut c_void,
        size: u32,
        written: *mut u32,
    );
    fn WHvSetVirtualProcessorXsaveState(
        partition: WHV_PARTITION_HANDLE,
        index: u32,
        buffer: *const c_void,
        size: u32,
    );
    fn WHvGetVirtualProcessorInterruptControllerState2(
        partition: WHV_PARTITION_HANDLE,
        index: u32,
        state: *mut c_void,
        size: u32,
        written: *mut u32,
    );
    fn WHvSetVirtualProcessorInterruptControllerState2(
        partition: WHV_PARTITION_HANDLE,
        index: u32,
        state: *const c_void,
        size: u32,
    );
    fn WHvRequestInterrupt(
        partition: WHV_PARTITION_HANDLE,
        interrupt: *const WHV_INTERRUPT_CONTROL,
        size: u32,
    );
    fn WHvTranslateGva(
        partition: WHV_PARTITION_HANDLE,
        index: u32,
        gva: u64,
        flags: WHV_TRANSLATE_GVA_FLAGS,
        result: *mut WHV_TRANSLATE_GVA_RESULT,
        gpa: *mut u64,
    );
}

dynamic! { Dll::Emulation =>
    fn WHvEmulatorCreateEmulator(callbacks: *const WHV_EMULATOR_CALLBACKS, emulator: *mut *mut c_void);
    fn WHvEmulatorDestroyEmulator(emulator: *const c_void);
    fn WHvEmulatorTryMmioEmulation(
        emulator: *const c_void,
        context: *const c_void,
        vp: *const WHV_VP_EXIT_CONTEXT,
        access: *const WHV_MEMORY_ACCESS_CONTEXT,
        status: *mut WHV_EMULATOR_STATUS,
    );
}
