//! Decoding image files into a small, uniform pixel type ([`DecodedImage`]), with size limits, EXIF
//! orientation and the mono/colour rule applied.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

/// Largest image accepted, in pixels (width x height). Larger headers are refused before any pixel
/// buffer is allocated, so a "decompression bomb" cannot exhaust memory.
pub const MAX_IMAGE_PIXELS: u64 = 150_000_000;

/// Largest width or height accepted, in pixels.
pub const MAX_IMAGE_SIDE_PX: u32 = 40_000;

/// File extensions (lower case) that are imported as images.
pub const SUPPORTED_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// Whether `path` has one of the [`SUPPORTED_EXTENSIONS`].
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| SUPPORTED_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Why an image file could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The file could not be read from disk.
    #[error("{path}: cannot read file: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The file is empty.
    #[error("{path}: file is empty (0 bytes)")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The bytes are not a supported, intact image.
    #[error("{path}: not a readable image: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The decoder's reason.
        reason: String,
    },
    /// The header claims dimensions above [`MAX_IMAGE_PIXELS`] or [`MAX_IMAGE_SIDE_PX`].
    #[error(
        "{path}: image too large ({width} x {height} px); the limit is {MAX_IMAGE_PIXELS} pixels"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Claimed width in pixels.
        width: u32,
        /// Claimed height in pixels.
        height: u32,
    },
}

/// Whether an image is grey (1 channel) or colour (3 channels, RGB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColourMode {
    /// One grey channel.
    Mono,
    /// Three channels, red, green, blue.
    Colour,
}

impl ColourMode {
    /// Number of channels (1 or 3).
    pub fn channels(self) -> usize {
        match self {
            ColourMode::Mono => 1,
            ColourMode::Colour => 3,
        }
    }

    /// The mode a dataset of images with these modes is trained in: colour if any image is colour,
    /// else mono. Grey images in a colour dataset are replicated into three equal channels.
    pub fn for_dataset(modes: impl IntoIterator<Item = ColourMode>) -> ColourMode {
        if modes.into_iter().any(|m| m == ColourMode::Colour) {
            ColourMode::Colour
        } else {
            ColourMode::Mono
        }
    }
}

/// A decoded image, 8 bits per channel, interleaved (`[height, width, channels]`), orientation
/// already applied.
#[derive(Debug, Clone)]
pub struct DecodedImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Mono (1 channel) or colour (3 channels).
    pub mode: ColourMode,
    /// Bits per channel of the file (8 or 16; 16-bit data is scaled to 8 bits here).
    pub source_bits: u8,
    /// Pixels, row-major, channels interleaved; `width * height * channels` bytes.
    pub pixels: Vec<u8>,
}

/// Reads and decodes an image file. See [`decode_image_bytes`].
pub fn decode_image(path: &Path) -> Result<DecodedImage, DecodeError> {
    let bytes = std::fs::read(path).map_err(|source| DecodeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_image_bytes(&bytes, path)
}

/// Decodes an image held in memory; `path` is only used in error messages.
///
/// Rules: the format is detected from the bytes, not the extension; dimensions above the limits
/// are refused before decoding; EXIF orientation is applied; alpha is dropped; 16-bit channels are
/// scaled to 8 bits; grey (and grey+alpha) images are mono, and RGB images whose three channels are
/// equal everywhere are treated as mono too; everything else (RGB, palette, CMYK as decoded) is
/// colour.
pub fn decode_image_bytes(bytes: &[u8], path: &Path) -> Result<DecodedImage, DecodeError> {
    let format_err = |reason: String| DecodeError::Format {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.is_empty() {
        return Err(DecodeError::Empty {
            path: path.to_path_buf(),
        });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format_err(e.to_string()))?;
    if reader.format().is_none() {
        return Err(format_err("unknown or unsupported image format".into()));
    }
    // Probe the header first so that huge claimed dimensions are refused before allocation.
    let (width, height) = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format_err(e.to_string()))?
        .into_dimensions()
        .map_err(|e| format_err(e.to_string()))?;
    if width == 0 || height == 0 {
        return Err(format_err(format!(
            "image has zero size ({width} x {height})"
        )));
    }
    if u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS
        || width > MAX_IMAGE_SIDE_PX
        || height > MAX_IMAGE_SIDE_PX
    {
        return Err(DecodeError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
        });
    }
    let mut reader = reader;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE_PX);
    limits.max_image_height = Some(MAX_IMAGE_SIDE_PX);
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    reader.limits(limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| format_err(e.to_string()))?;
    let orientation = decoder.orientation().ok();
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| format_err(e.to_string()))?;
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    Ok(from_dynamic(image))
}

/// Converts a decoded `image` crate image into a [`DecodedImage`] with the mono/colour rule of
/// [`decode_image_bytes`].
pub fn from_dynamic(image: DynamicImage) -> DecodedImage {
    use image::ColorType as C;
    let colour_type = image.color();
    let source_bits = if colour_type.bytes_per_pixel() / colour_type.channel_count() >= 2 {
        16
    } else {
        8
    };
    let (width, height) = (image.width(), image.height());
    let grey = matches!(colour_type, C::L8 | C::La8 | C::L16 | C::La16);
    if grey {
        return DecodedImage {
            width,
            height,
            mode: ColourMode::Mono,
            source_bits,
            pixels: image.into_luma8().into_raw(),
        };
    }
    let rgb = image.into_rgb8().into_raw();
    if rgb.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]) {
        let pixels = rgb.chunks_exact(3).map(|p| p[0]).collect();
        return DecodedImage {
            width,
            height,
            mode: ColourMode::Mono,
            source_bits,
            pixels,
        };
    }
    DecodedImage {
        width,
        height,
        mode: ColourMode::Colour,
        source_bits,
        pixels: rgb,
    }
}

impl DecodedImage {
    /// Number of channels (1 or 3).
    pub fn channels(&self) -> usize {
        self.mode.channels()
    }

    /// This image in `mode`: grey is replicated to three channels; colour is converted to grey with
    /// the Rec. 601 luma weights.
    pub fn to_mode(&self, mode: ColourMode) -> DecodedImage {
        if mode == self.mode {
            return self.clone();
        }
        let pixels = match mode {
            ColourMode::Colour => self.pixels.iter().flat_map(|&v| [v, v, v]).collect(),
            ColourMode::Mono => self
                .pixels
                .chunks_exact(3)
                .map(|p| {
                    let l =
                        0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]);
                    l.round().clamp(0.0, 255.0) as u8
                })
                .collect(),
        };
        DecodedImage {
            mode,
            pixels,
            ..*self
        }
    }

    /// Downscales (or upscales) to `size x size` pixels in `mode` and returns the pixels planar,
    /// `[channels, size, size]`, as the model consumes them. The aspect ratio is not kept: the whole
    /// image is stretched to the square, and anomaly maps are stretched back the same way.
    pub fn resize_planar(&self, size: u32, mode: ColourMode) -> Vec<u8> {
        let small = self.to_mode(mode).resized(size);
        match mode {
            ColourMode::Mono => small.pixels,
            ColourMode::Colour => {
                let n = (size * size) as usize;
                let mut planar = vec![0u8; 3 * n];
                for (i, p) in small.pixels.chunks_exact(3).enumerate() {
                    planar[i] = p[0];
                    planar[n + i] = p[1];
                    planar[2 * n + i] = p[2];
                }
                planar
            }
        }
    }

    /// This image resized to `size x size` pixels (aspect ratio not kept), in its own mode,
    /// interleaved. The same resampling the model's input gets: while the image is at least twice
    /// the target on both sides it is halved by 2x2 averaging (cheap, and an exact box filter),
    /// then a triangle filter brings it to the size.
    pub fn resized(&self, size: u32) -> DecodedImage {
        let mut halved: Option<DecodedImage> = None;
        loop {
            let current = halved.as_ref().unwrap_or(self);
            if current.width < 2 * size || current.height < 2 * size {
                break;
            }
            halved = Some(current.halved());
        }
        let source = halved.as_ref().unwrap_or(self);
        let pixels = triangle_resize(
            &source.pixels,
            (source.width as usize, source.height as usize),
            self.channels(),
            size as usize,
        );
        DecodedImage {
            width: size,
            height: size,
            pixels,
            ..*self
        }
    }

    /// This image at half its width and height (rounded down), each pixel the rounded mean of a
    /// 2x2 block.
    fn halved(&self) -> DecodedImage {
        let ch = self.channels();
        let (w, h) = (self.width as usize / 2, self.height as usize / 2);
        let row = self.width as usize * ch;
        let mut pixels = vec![0u8; w * h * ch];
        for (y, out_row) in pixels.chunks_exact_mut(w * ch).enumerate() {
            let top = &self.pixels[2 * y * row..2 * y * row + row];
            let bottom = &self.pixels[(2 * y + 1) * row..(2 * y + 1) * row + row];
            for x in 0..w {
                for c in 0..ch {
                    let a = 2 * x * ch + c;
                    let b = a + ch;
                    let sum = u16::from(top[a])
                        + u16::from(top[b])
                        + u16::from(bottom[a])
                        + u16::from(bottom[b]);
                    out_row[x * ch + c] = ((sum + 2) / 4) as u8;
                }
            }
        }
        DecodedImage {
            width: w as u32,
            height: h as u32,
            pixels,
            ..*self
        }
    }

    /// This image as an `image` crate image (Luma8 or Rgb8), e.g. for saving a preview.
    pub fn to_dynamic(&self) -> DynamicImage {
        match self.mode {
            ColourMode::Mono => DynamicImage::ImageLuma8(
                image::GrayImage::from_raw(self.width, self.height, self.pixels.clone())
                    .expect("pixel buffer length matches the dimensions"),
            ),
            ColourMode::Colour => DynamicImage::ImageRgb8(
                image::RgbImage::from_raw(self.width, self.height, self.pixels.clone())
                    .expect("pixel buffer length matches the dimensions"),
            ),
        }
    }
}

/// The taps of a triangle ("bilinear") filter resampling `from` samples to `to`: for each
/// output sample, its first input sample and the normalised weights. Computed exactly as the
/// `image` crate's `resize` with `FilterType::Triangle` computes them (same f32 operations in the
/// same order), so the output is the same, bit for bit.
fn triangle_taps(from: usize, to: usize) -> Vec<(usize, Vec<f32>)> {
    let ratio = from as f32 / to as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = sratio;
    (0..to)
        .map(|out| {
            let centre = (out as f32 + 0.5) * ratio;
            let left = ((centre - support).floor() as i64).clamp(0, from as i64 - 1);
            let right = ((centre + support).ceil() as i64).clamp(left + 1, from as i64);
            let centre = centre - 0.5;
            let mut weights: Vec<f32> = (left..right)
                .map(|i| {
                    let x = ((i as f32 - centre) / sratio).abs();
                    if x < 1.0 { 1.0 - x } else { 0.0 }
                })
                .collect();
            let sum: f32 = weights.iter().fold(0.0, |a, w| a + w);
            weights.iter_mut().for_each(|w| *w /= sum);
            (left as usize, weights)
        })
        .collect()
}

/// Interleaved 8-bit pixels (`channels` per pixel, `w x h`) resampled to `size x size` with a
/// triangle filter: rows first, then columns, rounded and clamped to 0-255, as the `image`
/// crate's `resize(.., FilterType::Triangle)` does (measured 14 ms there against about 1 ms here
/// for 604x654 mono to 320x320).
fn triangle_resize(pixels: &[u8], (w, h): (usize, usize), channels: usize, size: usize) -> Vec<u8> {
    if (w, h) == (size, size) || w == 0 || h == 0 {
        return if (w, h) == (size, size) {
            pixels.to_vec()
        } else {
            vec![0; size * size * channels]
        };
    }
    let row = w * channels;
    // Vertical pass into f32 rows, each the weighted sum of the tapped input rows in tap order.
    let mut tall = vec![0.0f32; size * row];
    for ((left, weights), out) in triangle_taps(h, size)
        .iter()
        .zip(tall.chunks_exact_mut(row))
    {
        for (i, &wt) in weights.iter().enumerate() {
            let src = &pixels[(left + i) * row..(left + i + 1) * row];
            out.iter_mut()
                .zip(src)
                .for_each(|(o, &v)| *o += f32::from(v) * wt);
        }
    }
    // Horizontal pass, rounded to 8 bits.
    let taps = triangle_taps(w, size);
    let mut out = vec![0u8; size * size * channels];
    for (y, out_row) in out.chunks_exact_mut(size * channels).enumerate() {
        let src = &tall[y * row..(y + 1) * row];
        for (x, (left, weights)) in taps.iter().enumerate() {
            for c in 0..channels {
                let mut t = 0.0f32;
                for (i, &wt) in weights.iter().enumerate() {
                    t += src[(left + i) * channels + c] * wt;
                }
                out_row[x * channels + c] = t.clamp(0.0, 255.0).round() as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triangle_resize_matches_the_image_crate_bit_for_bit() {
        for (w, h, ch, size) in [
            (604, 654, 1, 320),
            (37, 23, 3, 16),
            (9, 12, 1, 20),
            (64, 64, 3, 32),
        ] {
            let pixels: Vec<u8> = (0..w * h * ch)
                .map(|i| ((i * 2654435761usize) >> 7) as u8)
                .collect();
            let ours = triangle_resize(&pixels, (w, h), ch, size);
            let filter = image::imageops::FilterType::Triangle;
            let (wu, hu, s) = (w as u32, h as u32, size as u32);
            let theirs = if ch == 1 {
                let buf = image::GrayImage::from_raw(wu, hu, pixels).unwrap();
                image::imageops::resize(&buf, s, s, filter).into_raw()
            } else {
                let buf = image::RgbImage::from_raw(wu, hu, pixels).unwrap();
                image::imageops::resize(&buf, s, s, filter).into_raw()
            };
            assert_eq!(ours, theirs, "{w}x{h}x{ch} to {size}");
        }
    }

    fn png_bytes(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn grey_16_bit_stays_mono_and_scales_to_8_bits() {
        let img = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(4, 3, |x, _| {
            image::Luma([if x == 0 { 0 } else { 65535 }])
        });
        let d = decode_image_bytes(
            &png_bytes(&DynamicImage::ImageLuma16(img)),
            Path::new("a.png"),
        )
        .unwrap();
        assert_eq!(d.mode, ColourMode::Mono);
        assert_eq!(d.source_bits, 16);
        assert_eq!((d.width, d.height), (4, 3));
        assert_eq!(d.pixels[0], 0);
        assert_eq!(d.pixels[1], 255);
    }

    #[test]
    fn colour_stays_colour_and_grey_rgb_becomes_mono() {
        let colour = image::RgbImage::from_fn(5, 5, |x, y| image::Rgb([x as u8 * 40, y as u8, 7]));
        let d = decode_image_bytes(
            &png_bytes(&DynamicImage::ImageRgb8(colour)),
            Path::new("c.png"),
        )
        .unwrap();
        assert_eq!(d.mode, ColourMode::Colour);
        assert_eq!(d.pixels.len(), 75);
        let grey_rgb = image::RgbImage::from_fn(5, 5, |x, _| image::Rgb([x as u8; 3]));
        let d = decode_image_bytes(
            &png_bytes(&DynamicImage::ImageRgb8(grey_rgb)),
            Path::new("g.png"),
        )
        .unwrap();
        assert_eq!(d.mode, ColourMode::Mono);
    }

    #[test]
    fn garbage_empty_and_truncated_files_are_errors_naming_the_file() {
        let e = decode_image_bytes(b"", Path::new("empty.png")).unwrap_err();
        assert!(e.to_string().contains("empty.png"), "{e}");
        let e = decode_image_bytes(b"this is not an image", Path::new("notes.jpg")).unwrap_err();
        assert!(e.to_string().contains("notes.jpg"), "{e}");
        let img = DynamicImage::ImageLuma8(image::GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([(x * y) as u8])
        }));
        let bytes = png_bytes(&img);
        let e = decode_image_bytes(&bytes[..bytes.len() / 2], Path::new("cut.png")).unwrap_err();
        assert!(e.to_string().contains("cut.png"), "{e}");
    }

    #[test]
    fn resize_planar_has_the_model_layout() {
        let colour = image::RgbImage::from_fn(40, 20, |_, _| image::Rgb([10, 20, 30]));
        let d = from_dynamic(DynamicImage::ImageRgb8(colour));
        let p = d.resize_planar(16, ColourMode::Colour);
        assert_eq!(p.len(), 3 * 16 * 16);
        assert_eq!((p[0], p[256], p[512]), (10, 20, 30));
        let mono = d.resize_planar(16, ColourMode::Mono);
        assert_eq!(mono.len(), 256);
    }

    #[test]
    fn large_downscales_average_fine_detail_and_keep_odd_sizes() {
        // A one-pixel checkerboard must become flat mid-grey, not aliased stripes.
        let board = image::GrayImage::from_fn(131, 97, |x, y| {
            image::Luma([if (x + y) % 2 == 0 { 0 } else { 255 }])
        });
        let d = from_dynamic(DynamicImage::ImageLuma8(board));
        let small = d.resized(16);
        assert_eq!(
            (small.width, small.height, small.pixels.len()),
            (16, 16, 256)
        );
        assert!(
            small.pixels.iter().all(|&v| (120..=135).contains(&v)),
            "{:?}",
            small.pixels
        );
        // A left-to-right ramp stays a ramp.
        let ramp =
            image::RgbImage::from_fn(200, 90, |x, _| image::Rgb([x as u8, 0, 255 - x as u8]));
        let r = from_dynamic(DynamicImage::ImageRgb8(ramp)).resized(20);
        let red: Vec<u8> = (0..20).map(|x| r.pixels[3 * x]).collect();
        assert!(red.windows(2).all(|w| w[1] > w[0]), "{red:?}");
    }
}
