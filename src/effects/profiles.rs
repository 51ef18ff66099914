//! Finding and reading allowlist profiles: the bundled ones plus the user's `NAME.txt` files.
//!
//! A user file of the same name replaces a bundled profile entirely, so a site can narrow
//! or widen `dev-standard` without forking the binary. Parsing itself is pure
//! (`crate::core::profile`); this module only reads files, and refuses oversized ones
//! because a profile directory may be shared or generated.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::core::bundled;
use crate::core::profile::{self, LineNotice, Profile, ProfileError, ProfileName};
use crate::core::target::Target;

/// Largest profile file we read; anything bigger is refused rather than parsed.
pub const MAX_PROFILE_BYTES: u64 = 16 * 1024 * 1024;

/// Where a profile comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileSource {
    /// Compiled into the binary.
    Bundled,
    /// A user file `NAME.txt` in the profiles directory.
    User(PathBuf),
}

/// One entry of `ProfileStore::list`: enough to show the user what a name will load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileInfo {
    pub name: ProfileName,
    pub source: ProfileSource,
    /// A user file shadows a bundled profile of the same name.
    pub overrides_bundled: bool,
}

/// Why profiles could not be listed or loaded; each message names the path and the fix.
#[derive(Debug, Error)]
pub enum ProfileStoreError {
    /// Bad name, bad lines or unknown profile (the core's own messages).
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The file exists but could not be read.
    #[error(
        "cannot read profile file {path}: {source}; make it a readable regular file or remove it"
    )]
    Read { path: PathBuf, source: io::Error },
    /// The file is readable but not UTF-8 text.
    #[error(
        "profile file {path} is not UTF-8 text; save it as UTF-8 (one entry per line) or remove it"
    )]
    NotText { path: PathBuf },
    /// Over `MAX_PROFILE_BYTES`.
    #[error("profile file {path} is larger than the 16 MiB limit; split it into smaller profiles or remove entries")]
    TooLarge { path: PathBuf },
    /// The profiles directory exists but cannot be listed.
    #[error("cannot list the profiles directory {path}: {source}; make it readable or remove it")]
    ListDir { path: PathBuf, source: io::Error },
    /// A user profile could not be written (`allow --save-to`).
    #[error(
        "cannot write profile file {path}: {source}; check that the profiles directory is writable"
    )]
    Write { path: PathBuf, source: io::Error },
    /// Saving into a name only the binary ships would shadow the whole bundled profile.
    #[error("`{0}` is a bundled profile, and a user file of that name would replace it entirely; save into another profile name")]
    ShadowsBundled(ProfileName),
    /// Several profiles failed at once (`load_many`); every failure is kept.
    #[error("{}", render_several(.0))]
    Several(Vec<ProfileStoreError>),
}

fn render_several(errors: &[ProfileStoreError]) -> String {
    let mut out = format!("{} problems with the requested profiles:", errors.len());
    for e in errors {
        for (i, line) in e.to_string().lines().enumerate() {
            out.push_str(if i == 0 { "\n- " } else { "\n  " });
            out.push_str(line);
        }
    }
    out
}

/// A user profile with one entry more, not yet written ([`ProfileStore::add_entry`]).
#[derive(Debug, Clone)]
pub struct ProfileEdit {
    dir: PathBuf,
    /// The profile's file.
    pub path: PathBuf,
    /// The profile as it is after the edit.
    pub profile: Profile,
    /// The new file content; `None` when the profile lists the entry already.
    text: Option<String>,
}

impl ProfileEdit {
    /// Write the file (and its directory, when missing): a temporary sibling renamed into
    /// place, so a crash leaves the old or the new version.
    pub fn write(&self) -> Result<(), ProfileStoreError> {
        let Some(text) = &self.text else {
            return Ok(());
        };
        let write_err = |source| ProfileStoreError::Write {
            path: self.path.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(write_err)?;
        let tmp = self
            .path
            .with_extension(format!("txt.tmp.{}", std::process::id()));
        fs::write(&tmp, text)
            .and_then(|()| fs::rename(&tmp, &self.path))
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                write_err(e)
            })
    }
}

/// The bundled profiles plus a user profiles directory (which need not exist).
#[derive(Debug, Clone)]
pub struct ProfileStore {
    dir: PathBuf,
}

impl fmt::Display for ProfileSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProfileSource::Bundled => f.write_str("bundled"),
            ProfileSource::User(path) => write!(f, "{}", path.display()),
        }
    }
}

impl ProfileStore {
    /// A store over `dir` (usually `Paths::profiles_dir`); nothing is read yet.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ProfileStore { dir: dir.into() }
    }

    /// The user profiles directory, for messages that tell users where to put files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path a user profile of this name would have.
    pub fn user_path(&self, name: &ProfileName) -> PathBuf {
        self.dir.join(format!("{name}.txt"))
    }

    /// Every available profile, bundled and user, sorted by name.
    ///
    /// A missing directory just means "no user profiles". Files whose stem is not a valid
    /// profile name (or that do not end in `.txt`) are not profiles and are skipped.
    pub fn list(&self) -> Result<Vec<ProfileInfo>, ProfileStoreError> {
        let mut out: Vec<ProfileInfo> = bundled::bundled()
            .iter()
            .map(|(name, _)| ProfileInfo {
                name: ProfileName::new(name).expect("bundled profile names are valid"),
                source: ProfileSource::Bundled,
                overrides_bundled: false,
            })
            .collect();
        for (name, path) in self.user_files()? {
            let overrides_bundled = bundled::bundled_text(name.as_str()).is_some();
            out.retain(|p| p.name != name);
            out.push(ProfileInfo {
                name,
                source: ProfileSource::User(path),
                overrides_bundled,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Load one profile: the user's `NAME.txt` if present, else the bundled one.
    pub fn load(&self, name: &ProfileName) -> Result<Profile, ProfileStoreError> {
        let path = self.user_path(name);
        if let Some(text) = read_if_present(&path)? {
            return Ok(profile::parse_profile(&path.display().to_string(), &text)?);
        }
        if let Some(text) = bundled::bundled_text(name.as_str()) {
            return Ok(profile::parse_profile(&format!("bundled:{name}"), text)?);
        }
        Err(ProfileError::Unknown {
            name: name.to_string(),
            available: self.available_names(),
            dir: self.dir.display().to_string(),
        }
        .into())
    }

    /// Load several profiles and merge them in order (first occurrence of an entry wins).
    ///
    /// All-or-nothing: every failure of every profile is reported together, and no entries
    /// are returned if any profile is bad, so a typo can never yield a partial allowlist.
    pub fn load_many(
        &self,
        names: &[ProfileName],
    ) -> Result<(Vec<Target>, Vec<LineNotice>), ProfileStoreError> {
        let mut loaded = Vec::with_capacity(names.len());
        let mut bad_lines = Vec::new();
        let mut errors = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                continue;
            }
            match self.load(name) {
                Ok(p) => loaded.push(p),
                Err(ProfileStoreError::Profile(ProfileError::BadLines(lines))) => {
                    bad_lines.extend(lines)
                }
                Err(e) => errors.push(e),
            }
        }
        if !bad_lines.is_empty() {
            errors.push(ProfileError::BadLines(bad_lines).into());
        }
        match errors.len() {
            0 => {
                let targets = profile::compose(&loaded);
                let notices = loaded.into_iter().flat_map(|p| p.notices).collect();
                Ok((targets, notices))
            }
            1 => Err(errors.pop().expect("one error")),
            _ => Err(ProfileStoreError::Several(errors)),
        }
    }

    /// Prepare adding `target` to the user profile `name` (a new file when there is none):
    /// the profile as it would be, written only by [`ProfileEdit::write`], so a caller can
    /// check the change before anything is on disk. A file that does not parse is never
    /// added to, and a bundled profile is never shadowed by a one-entry file of its name.
    pub fn add_entry(
        &self,
        name: &ProfileName,
        target: &Target,
        comment: &str,
    ) -> Result<ProfileEdit, ProfileStoreError> {
        let path = self.user_path(name);
        let before = read_if_present(&path)?;
        if before.is_none() && bundled::bundled_text(name.as_str()).is_some() {
            return Err(ProfileStoreError::ShadowsBundled(name.clone()));
        }
        let before = before.unwrap_or_default();
        let source = path.display().to_string();
        let profile = profile::parse_profile(&source, &before)?;
        if profile.entries.contains(target) {
            return Ok(ProfileEdit {
                dir: self.dir.clone(),
                path,
                profile,
                text: None,
            });
        }
        let mut text = before;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        let comment: String = comment.chars().filter(|c| !c.is_control()).collect();
        text.push_str(&format!("{target}  # {comment}\n"));
        let profile = profile::parse_profile(&source, &text)?;
        Ok(ProfileEdit {
            dir: self.dir.clone(),
            path,
            profile,
            text: Some(text),
        })
    }

    /// `(name, path)` of every `NAME.txt` in the directory with a valid name.
    fn user_files(&self) -> Result<Vec<(ProfileName, PathBuf)>, ProfileStoreError> {
        let list_err = |source| ProfileStoreError::ListDir {
            path: self.dir.clone(),
            source,
        };
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(list_err(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(list_err)?;
            let file_name = entry.file_name();
            let Some(stem) = file_name.to_str().and_then(|n| n.strip_suffix(".txt")) else {
                continue;
            };
            let Ok(name) = ProfileName::new(stem) else {
                continue;
            };
            // Directories named `x.txt` are not profiles; broken links still are, so that
            // `load` reports them instead of the listing hiding them.
            if entry.path().is_dir() {
                continue;
            }
            out.push((name, entry.path()));
        }
        Ok(out)
    }

    /// Comma-separated names for "unknown profile" messages; falls back to bundled names
    /// if the directory cannot be listed (the lookup error matters more than that one).
    fn available_names(&self) -> String {
        let names: Vec<String> = match self.list() {
            Ok(list) => list.into_iter().map(|p| p.name.to_string()).collect(),
            Err(_) => bundled::bundled()
                .iter()
                .map(|(n, _)| n.to_string())
                .collect(),
        };
        names.join(", ")
    }
}

/// Read a user profile file: `Ok(None)` when there is no such file at all.
///
/// A dangling symlink is an error, not "absent": the user clearly meant to override.
fn read_if_present(path: &Path) -> Result<Option<String>, ProfileStoreError> {
    let read_err = |source| ProfileStoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return match fs::symlink_metadata(path) {
                Ok(_) => Err(read_err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "it is a symbolic link to a file that does not exist",
                ))),
                Err(_) => Ok(None),
            };
        }
        Err(e) => return Err(read_err(e)),
    };
    let meta = file.metadata().map_err(read_err)?;
    if meta.is_dir() {
        return Err(read_err(io::Error::other("it is a directory")));
    }
    if meta.len() > MAX_PROFILE_BYTES {
        return Err(ProfileStoreError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    // Bounded read as well: the size above is not trustworthy for pipes or device files.
    let mut bytes = Vec::new();
    file.take(MAX_PROFILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_PROFILE_BYTES {
        return Err(ProfileStoreError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| ProfileStoreError::NotText {
            path: path.to_path_buf(),
        })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A throwaway directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "terok-shield-profiles-test-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn name(s: &str) -> ProfileName {
        ProfileName::new(s).unwrap()
    }

    fn shown(targets: &[Target]) -> Vec<String> {
        targets.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn add_entry_creates_appends_once_and_never_shadows_a_bundled_profile() {
        let tmp = TempDir::new();
        let store = ProfileStore::new(tmp.0.join("profiles"));
        let svc = Target::parse("svc.example.com").unwrap();
        let edit = store
            .add_entry(&name("c1"), &svc, "from clearance")
            .unwrap();
        assert!(!edit.path.exists(), "nothing written before `write`");
        edit.write().unwrap();
        let (path, p) = (edit.path, edit.profile);
        assert_eq!(shown(&p.entries), ["svc.example.com"]);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "svc.example.com  # from clearance\n"
        );
        let p = store.add_entry(&name("c1"), &svc, "again").unwrap().profile;
        assert_eq!(p.entries.len(), 1, "listed once");
        fs::write(&path, "# mine\n198.51.100.7").unwrap();
        let edit = store.add_entry(&name("c1"), &svc, "line\nbreak").unwrap();
        edit.write().unwrap();
        let p = edit.profile;
        assert_eq!(shown(&p.entries), ["198.51.100.7", "svc.example.com"]);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "# mine\n198.51.100.7\nsvc.example.com  # linebreak\n"
        );
        fs::write(&path, "bad..name\n").unwrap();
        assert!(store.add_entry(&name("c1"), &svc, "").is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), "bad..name\n");
        let err = store.add_entry(&name("base"), &svc, "").unwrap_err();
        assert!(err.to_string().contains("another profile name"), "{err}");
    }

    #[test]
    fn missing_dir_lists_only_bundled() {
        let store = ProfileStore::new("/nonexistent/terok-shield/profiles");
        let list = store.list().unwrap();
        let names: Vec<&str> = list.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "base",
                "dev-node",
                "dev-python",
                "dev-standard",
                "nvidia-hpc"
            ]
        );
        assert!(list
            .iter()
            .all(|p| p.source == ProfileSource::Bundled && !p.overrides_bundled));
        assert!(!store
            .load(&name("dev-standard"))
            .unwrap()
            .entries
            .is_empty());
    }

    #[test]
    fn user_files_are_listed_and_override_bundled() {
        let dir = TempDir::new();
        let own = dir.write("dev-standard.txt", "example.com\n");
        let mine = dir.write("my-project.txt", "api.example.org\n");
        dir.write("README.md", "not a profile\n");
        dir.write("bad name.txt", "ignored\n");
        fs::create_dir(dir.0.join("folder.txt")).unwrap();
        let store = ProfileStore::new(&dir.0);

        let list = store.list().unwrap();
        let names: Vec<&str> = list.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "base",
                "dev-node",
                "dev-python",
                "dev-standard",
                "my-project",
                "nvidia-hpc"
            ]
        );
        let std = list
            .iter()
            .find(|p| p.name.as_str() == "dev-standard")
            .unwrap();
        assert_eq!(std.source, ProfileSource::User(own));
        assert!(std.overrides_bundled);
        let my = list
            .iter()
            .find(|p| p.name.as_str() == "my-project")
            .unwrap();
        assert_eq!(my.source, ProfileSource::User(mine));
        assert!(!my.overrides_bundled);

        let loaded = store.load(&name("dev-standard")).unwrap();
        assert_eq!(shown(&loaded.entries), ["example.com"]);
    }

    #[test]
    fn unknown_profile_lists_what_exists_and_where_to_add_it() {
        let dir = TempDir::new();
        dir.write("mine.txt", "example.com\n");
        let store = ProfileStore::new(&dir.0);
        let err = store.load(&name("nope")).unwrap_err();
        let ProfileStoreError::Profile(ProfileError::Unknown {
            available, dir: d, ..
        }) = &err
        else {
            panic!("{err}")
        };
        assert!(
            available.contains("dev-standard") && available.contains("mine"),
            "{available}"
        );
        assert_eq!(d, &dir.0.display().to_string());
        assert!(err.to_string().contains("nope.txt"), "{err}");
    }

    #[test]
    fn unreadable_and_non_text_files_are_errors_naming_the_path() {
        let dir = TempDir::new();
        fs::create_dir(dir.0.join("dir.txt")).unwrap();
        let store = ProfileStore::new(&dir.0);
        let err = store.load(&name("dir")).unwrap_err();
        assert!(matches!(err, ProfileStoreError::Read { .. }), "{err}");
        assert!(err.to_string().contains("dir.txt"), "{err}");
        assert!(err.to_string().contains("remove it"), "{err}");

        fs::write(dir.0.join("bin.txt"), [0xff, 0xfe, 0x00]).unwrap();
        let err = store.load(&name("bin")).unwrap_err();
        assert!(matches!(err, ProfileStoreError::NotText { .. }), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn dangling_symlink_is_not_silently_replaced_by_bundled() {
        let dir = TempDir::new();
        std::os::unix::fs::symlink(dir.0.join("gone"), dir.0.join("dev-standard.txt")).unwrap();
        let store = ProfileStore::new(&dir.0);
        let err = store.load(&name("dev-standard")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn oversized_files_are_refused() {
        let dir = TempDir::new();
        let path = dir.0.join("huge.txt");
        let f = fs::File::create(&path).unwrap();
        f.set_len(MAX_PROFILE_BYTES + 1).unwrap();
        let err = ProfileStore::new(&dir.0).load(&name("huge")).unwrap_err();
        assert!(matches!(err, ProfileStoreError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("16 MiB"), "{err}");
    }

    #[test]
    fn load_many_composes_in_order_and_keeps_notices() {
        let dir = TempDir::new();
        dir.write("a.txt", "x.example\n10.1.2.3\n");
        dir.write("b.txt", "10.1.2.3\ny.example\n");
        let store = ProfileStore::new(&dir.0);
        let (targets, notices) = store.load_many(&[name("a"), name("b"), name("a")]).unwrap();
        assert_eq!(shown(&targets), ["x.example", "10.1.2.3", "y.example"]);
        // 10.1.2.3 is private: one notice per line that lists it.
        assert_eq!(notices.len(), 2);
        assert!(notices[0].to_string().contains("a.txt:2"), "{}", notices[0]);
        assert_eq!(store.load_many(&[]).unwrap().0, Vec::<Target>::new());
    }

    #[test]
    fn load_many_reports_every_problem_and_returns_nothing() {
        let dir = TempDir::new();
        dir.write("good.txt", "example.com\n");
        dir.write("bad1.txt", "ok.example\nbad..name\n");
        dir.write("bad2.txt", "1.2.3.4/40\n");
        let store = ProfileStore::new(&dir.0);
        let err = store
            .load_many(&[name("good"), name("bad1"), name("missing"), name("bad2")])
            .unwrap_err();
        let ProfileStoreError::Several(errors) = &err else {
            panic!("{err}")
        };
        assert_eq!(errors.len(), 2);
        let msg = err.to_string();
        assert!(msg.contains("unknown profile `missing`"), "{msg}");
        assert!(msg.contains("bad1.txt:2: `bad..name`"), "{msg}");
        assert!(msg.contains("bad2.txt:1: `1.2.3.4/40`"), "{msg}");

        // A single failure comes back as itself, not wrapped.
        let err = store.load_many(&[name("good"), name("bad2")]).unwrap_err();
        assert!(
            matches!(err, ProfileStoreError::Profile(ProfileError::BadLines(_))),
            "{err}"
        );
    }
}
