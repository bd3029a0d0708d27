//! Feeds arbitrary bytes to the pgoutput decoder, which must never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use walshuttle::stream::decoder::decode;

fuzz_target!(|data: &[u8]| {
    let _ = decode(data, false);
    let _ = decode(data, true);
});
