//! Image import on arbitrary bytes: decoding (any supported format, EXIF, 16 bit, palette, CMYK,
//! size limits) and downscaling to the training size must return an image or an error, never
//! panic, hang or allocate past the pixel limit.
#![no_main]

use std::path::Path;

use inkspect::engine::dataset::decode::{ColourMode, decode_image_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = decode_image_bytes(data, Path::new("fuzz.png")) {
        assert_eq!(
            img.pixels.len(),
            img.width as usize * img.height as usize * img.channels()
        );
        for mode in [ColourMode::Mono, ColourMode::Colour] {
            let planar = img.resize_planar(32, mode);
            assert_eq!(planar.len(), 32 * 32 * mode.channels());
        }
    }
});
