//! The project: one versioned JSON file holding the framework, the imported images with their
//! roles, the dataset and training settings, the thresholds and the trained model's path. Saved
//! atomically, with the previous version kept as `<file>.bak`. Paths inside the project's folder
//! are stored relative to it, so a project folder can be moved.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::dataset::decode::ColourMode;
use crate::engine::dataset::import::{ImageRole, ImportReport, ImportedImage};
use crate::engine::dataset::prepare::DatasetSettings;
use crate::engine::inference::Thresholds;
use crate::engine::model::Framework;
use crate::engine::training::TrainingSettings;

/// Version of the project file layout written by this build.
pub const PROJECT_FORMAT_VERSION: u32 = 1;

/// File extension of project files.
pub const PROJECT_EXTENSION: &str = "inkspect";

/// File extension of model files.
pub const MODEL_EXTENSION: &str = "ink";

/// An Inkspect project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Project {
    /// Layout version of the file this was read from / will be written as.
    pub format_version: u32,
    /// Name shown in the title bar and notifications.
    pub name: String,
    /// Model type.
    pub framework: Framework,
    /// Imported images with roles.
    pub images: Vec<ImportedImage>,
    /// Image size and complexity.
    pub dataset: DatasetSettings,
    /// Epochs, error threshold and optimiser settings.
    pub training: TrainingSettings,
    /// Thresholds chosen by the user; `None` means "use the model's suggestion".
    pub thresholds: Option<Thresholds>,
    /// The trained model file, if any.
    pub model_path: Option<PathBuf>,
}

impl Default for Project {
    fn default() -> Self {
        Self {
            format_version: PROJECT_FORMAT_VERSION,
            name: "Untitled".into(),
            framework: Framework::default(),
            images: Vec::new(),
            dataset: DatasetSettings::default(),
            training: TrainingSettings::default(),
            thresholds: None,
            model_path: None,
        }
    }
}

/// Why a project file could not be read or written. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// Not valid project JSON (truncated or damaged).
    #[error("{path}: not a valid Inkspect project ({reason})")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        reason: String,
    },
    /// Written by a newer Inkspect.
    #[error(
        "{path}: project format version {found} is newer than this Inkspect supports ({PROJECT_FORMAT_VERSION}); update Inkspect"
    )]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Version found.
        found: u32,
    },
}

/// Image counts per role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoleCounts {
    /// Good training images.
    pub train_good: usize,
    /// Good test images.
    pub test_good: usize,
    /// Nok test images.
    pub test_nok: usize,
}

impl Project {
    /// A new, empty project with default settings.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Reads a project file. Relative paths inside are resolved against the file's folder.
    pub fn load(path: &Path) -> Result<Project, ProjectError> {
        let bytes = std::fs::read(path).map_err(|source| ProjectError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| ProjectError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        let found = value
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| invalid("no format_version field".into()))?;
        if found > u64::from(PROJECT_FORMAT_VERSION) {
            return Err(ProjectError::TooNew {
                path: path.to_path_buf(),
                found: found as u32,
            });
        }
        let mut project: Project =
            serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        project.format_version = PROJECT_FORMAT_VERSION;
        let base = folder_of(path);
        for img in &mut project.images {
            img.path = resolve(&base, &img.path);
            img.mask = img.mask.as_ref().map(|m| resolve(&base, m));
        }
        project.model_path = project.model_path.as_ref().map(|m| resolve(&base, m));
        Ok(project)
    }

    /// Writes the project atomically; the previous file, if any, is kept as `<file>.bak`.
    pub fn save(&self, path: &Path) -> Result<(), ProjectError> {
        let base = folder_of(path);
        let mut stored = self.clone();
        stored.format_version = PROJECT_FORMAT_VERSION;
        for img in &mut stored.images {
            img.path = relativize(&base, &img.path);
            img.mask = img.mask.as_ref().map(|m| relativize(&base, m));
        }
        stored.model_path = stored.model_path.as_ref().map(|m| relativize(&base, m));
        let json = serde_json::to_vec_pretty(&stored).map_err(|e| ProjectError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let io = |source| ProjectError::Io {
            path: path.to_path_buf(),
            source,
        };
        if path.is_file() {
            std::fs::copy(path, backup_path(path)).map_err(io)?;
        }
        crate::engine::atomic_write(path, &json).map_err(io)
    }

    /// Adds what an import brought in (duplicates by content hash are skipped) and returns how
    /// many images were added.
    pub fn add_imported(&mut self, report: &ImportReport) -> usize {
        let mut known = self.content_hashes();
        let before = self.images.len();
        for img in &report.imported {
            if known.insert(img.content_hash.clone()) {
                self.images.push(img.clone());
            }
        }
        self.images.len() - before
    }

    /// Content hashes of all images, for duplicate detection.
    pub fn content_hashes(&self) -> HashSet<String> {
        self.images.iter().map(|i| i.content_hash.clone()).collect()
    }

    /// Images with `role`.
    pub fn images_with_role(&self, role: ImageRole) -> impl Iterator<Item = &ImportedImage> {
        self.images.iter().filter(move |i| i.role == role)
    }

    /// Image counts per role.
    pub fn counts(&self) -> RoleCounts {
        let n = |r| self.images_with_role(r).count();
        RoleCounts {
            train_good: n(ImageRole::TrainGood),
            test_good: n(ImageRole::TestGood),
            test_nok: n(ImageRole::TestNok),
        }
    }

    /// Image files (and masks) that no longer exist on disk.
    pub fn missing_files(&self) -> Vec<PathBuf> {
        self.images
            .iter()
            .flat_map(|i| std::iter::once(&i.path).chain(i.mask.iter()))
            .filter(|p| !p.exists())
            .cloned()
            .collect()
    }

    /// The model file of this project saved at `project_file`: the recorded one, else
    /// `<project folder>/<name>.ink`.
    pub fn model_path_or_default(&self, project_file: &Path) -> PathBuf {
        self.model_path.clone().unwrap_or_else(|| {
            project_file.with_file_name(format!("{}.{MODEL_EXTENSION}", file_stem_for(&self.name)))
        })
    }

    /// Colour mode training would use.
    pub fn training_mode(&self) -> ColourMode {
        ColourMode::for_dataset(self.images_with_role(ImageRole::TrainGood).map(|i| i.mode))
    }
}

/// Where [`Project::save`] keeps the previous version of `project_file`: `<file>.bak`.
pub fn backup_path(project_file: &Path) -> PathBuf {
    crate::engine::path_with_suffix(project_file, ".bak")
}

/// `name` made safe as a file name stem (letters, digits, `-` and `_`; others become `_`).
pub fn file_stem_for(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() { "project".into() } else { s }
}

fn folder_of(path: &Path) -> PathBuf {
    let parent = path.parent().unwrap_or(Path::new("."));
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf())
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn relativize(base: &Path, p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    abs.strip_prefix(base).map(Path::to_path_buf).unwrap_or(abs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(path: &Path, hash: &str, role: ImageRole) -> ImportedImage {
        ImportedImage {
            path: path.to_path_buf(),
            role,
            defect_kind: None,
            mask: None,
            width: 8,
            height: 8,
            mode: ColourMode::Mono,
            file_bytes: 10,
            content_hash: hash.into(),
        }
    }

    #[test]
    fn save_load_round_trip_with_relative_paths_and_backup() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.inkspect");
        let mut p = Project::new("Dies");
        p.images.push(image(
            &dir.path().join("imgs/a.png"),
            "h1",
            ImageRole::TrainGood,
        ));
        p.images.push(image(
            Path::new("/elsewhere/b.png"),
            "h2",
            ImageRole::TestNok,
        ));
        p.thresholds = Some(Thresholds {
            segmentation: 0.1,
            classification: 0.2,
        });
        p.save(&file).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("\"imgs/a.png\""), "{text}");
        assert!(text.contains("/elsewhere/b.png"));
        let back = Project::load(&file).unwrap();
        assert_eq!(
            back.images[0].path,
            std::path::absolute(dir.path().join("imgs/a.png")).unwrap()
        );
        assert_eq!(back.thresholds, p.thresholds);
        assert_eq!(back.counts().test_nok, 1);
        assert_eq!(back.missing_files().len(), 2);
        p.name = "Second".into();
        p.save(&file).unwrap();
        let bak = Project::load(&dir.path().join("p.inkspect.bak")).unwrap();
        assert_eq!(bak.name, "Dies");
    }

    #[test]
    fn corrupt_and_newer_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.inkspect");
        std::fs::write(&file, b"{\"format_version\": 1, \"name\": ").unwrap();
        let e = Project::load(&file).unwrap_err();
        assert!(matches!(e, ProjectError::Invalid { .. }));
        assert!(e.to_string().contains("p.inkspect"));
        std::fs::write(&file, b"{\"format_version\": 99}").unwrap();
        assert!(matches!(
            Project::load(&file),
            Err(ProjectError::TooNew { found: 99, .. })
        ));
        std::fs::write(&file, b"{\"format_version\": 1, \"name\": \"old\"}").unwrap();
        let p = Project::load(&file).unwrap();
        assert_eq!(p.name, "old");
        assert_eq!(p.dataset.image_size_px, 320);
    }
}
