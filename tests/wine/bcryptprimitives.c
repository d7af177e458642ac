/* A stand-in bcryptprimitives.dll for running the Windows build of hostnet-forwarder under
 * Wine 8, which lacks ProcessPrng (Rust's standard library imports it on Windows since Rust
 * 1.78, for HashMap keys and the like). ProcessPrng fills the buffer from RtlGenRandom
 * (advapi32's SystemFunction036). Built by tests/src/wine.rs next to the .exe; for the tests
 * only, never shipped. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG len);

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        /* RtlGenRandom takes a ULONG length: fill in chunks. */
        ULONG chunk = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
