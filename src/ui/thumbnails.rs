//! Thumbnails decoded off the UI thread and cached as textures. The newest requests are decoded
//! first (a stack), so scrolling through a thousand large images stays smooth.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};

use eframe::egui::{self, ColorImage, TextureHandle, TextureOptions};

use crate::engine::dataset::decode::{ColourMode, decode_image};

/// Longest side of a thumbnail in pixels.
pub const THUMBNAIL_SIDE_PX: u32 = 128;

/// Number of decoding threads.
const WORKERS: usize = 2;

type Decoded = (PathBuf, Result<ColorImage, String>);

#[derive(Default)]
struct Queue {
    stack: Vec<PathBuf>,
    closed: bool,
}

/// Cache of thumbnail textures keyed by file path.
pub struct ThumbnailCache {
    textures: HashMap<PathBuf, TextureHandle>,
    failed: HashMap<PathBuf, String>,
    pending: HashSet<PathBuf>,
    queue: Arc<(Mutex<Queue>, Condvar)>,
    results: Receiver<Decoded>,
}

impl ThumbnailCache {
    /// Starts the decoding threads; `ctx` is asked to repaint when a thumbnail is ready.
    pub fn new(ctx: &egui::Context) -> Self {
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let (tx, rx) = channel();
        for i in 0..WORKERS {
            let queue = Arc::clone(&queue);
            let tx: Sender<Decoded> = tx.clone();
            let ctx = ctx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("inkspect-thumbnails-{i}"))
                .spawn(move || worker(&queue, &tx, &ctx));
        }
        Self {
            textures: HashMap::new(),
            failed: HashMap::new(),
            pending: HashSet::new(),
            queue,
            results: rx,
        }
    }

    /// Moves finished thumbnails into textures. Call once per frame.
    pub fn poll(&mut self, ctx: &egui::Context) {
        while let Ok((path, result)) = self.results.try_recv() {
            self.pending.remove(&path);
            match result {
                Ok(image) => {
                    let name = format!("thumb:{}", path.display());
                    let tex = ctx.load_texture(name, image, TextureOptions::LINEAR);
                    self.textures.insert(path, tex);
                }
                Err(e) => {
                    self.failed.insert(path, e);
                }
            }
        }
    }

    /// The thumbnail of `path` if ready; otherwise queues it and returns `None`.
    pub fn get(&mut self, path: &Path) -> Option<&TextureHandle> {
        if !self.textures.contains_key(path)
            && !self.failed.contains_key(path)
            && !self.pending.contains(path)
        {
            self.pending.insert(path.to_path_buf());
            let (lock, cvar) = &*self.queue;
            if let Ok(mut q) = lock.lock() {
                q.stack.push(path.to_path_buf());
                cvar.notify_one();
            }
        }
        self.textures.get(path)
    }

    /// Why the thumbnail of `path` could not be made, if it failed.
    pub fn error(&self, path: &Path) -> Option<&str> {
        self.failed.get(path).map(String::as_str)
    }

    /// Number of thumbnails waiting to be decoded.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

impl Drop for ThumbnailCache {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.queue;
        if let Ok(mut q) = lock.lock() {
            q.closed = true;
            q.stack.clear();
        }
        cvar.notify_all();
    }
}

fn worker(queue: &(Mutex<Queue>, Condvar), tx: &Sender<Decoded>, ctx: &egui::Context) {
    let (lock, cvar) = queue;
    loop {
        let path = {
            let Ok(mut q) = lock.lock() else { return };
            loop {
                if q.closed {
                    return;
                }
                if let Some(p) = q.stack.pop() {
                    break p;
                }
                q = match cvar.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        };
        let result = thumbnail(&path);
        if tx.send((path, result)).is_err() {
            return;
        }
        ctx.request_repaint();
    }
}

/// Decodes `path` and shrinks it to at most [`THUMBNAIL_SIDE_PX`] on its longest side.
pub fn thumbnail(path: &Path) -> Result<ColorImage, String> {
    let decoded = decode_image(path).map_err(|e| e.to_string())?;
    let scale = THUMBNAIL_SIDE_PX as f32 / decoded.width.max(decoded.height) as f32;
    let (w, h) = (
        ((decoded.width as f32 * scale).round() as u32).max(1),
        ((decoded.height as f32 * scale).round() as u32).max(1),
    );
    Ok(match decoded.mode {
        ColourMode::Mono => {
            let img = image::GrayImage::from_raw(decoded.width, decoded.height, decoded.pixels)
                .ok_or("bad pixel buffer")?;
            let small = image::imageops::thumbnail(&img, w, h);
            ColorImage::from_gray([w as usize, h as usize], small.as_raw())
        }
        ColourMode::Colour => {
            let img = image::RgbImage::from_raw(decoded.width, decoded.height, decoded.pixels)
                .ok_or("bad pixel buffer")?;
            let small = image::imageops::thumbnail(&img, w, h);
            ColorImage::from_rgb([w as usize, h as usize], small.as_raw())
        }
    })
}

/// A decoded image as an egui image (mono or RGB).
pub fn color_image(decoded: &crate::engine::dataset::decode::DecodedImage) -> ColorImage {
    let size = [decoded.width as usize, decoded.height as usize];
    match decoded.mode {
        ColourMode::Mono => ColorImage::from_gray(size, &decoded.pixels),
        ColourMode::Colour => ColorImage::from_rgb(size, &decoded.pixels),
    }
}
