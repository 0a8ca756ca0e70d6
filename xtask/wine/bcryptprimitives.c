/* ProcessPrng for Wine 8, which has no bcryptprimitives.dll. Rust's
 * standard library imports it on Windows for its random keys; on Windows
 * itself the real DLL is used. Built by `cargo xtask ci` with MinGW and put
 * next to the test executables, where Wine's loader looks first. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length); /* RtlGenRandom */

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG chunk = length > 0x10000000 ? 0x10000000 : (ULONG)length;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
