//! Stamps the binary with the git revision it was built from, for
//! `portcullis --version`. Outside a git checkout (the container build,
//! whose context leaves `.git` out, or a source tarball) the revision is
//! taken from `PORTCULLIS_GIT_REV` when set, else reported as unknown.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PORTCULLIS_GIT_REV");
    let revision = std::env::var("PORTCULLIS_GIT_REV").ok().filter(|r| !r.trim().is_empty()).or_else(git_revision);
    println!("cargo:rustc-env=PORTCULLIS_GIT_REV={}", revision.as_deref().unwrap_or("unknown").trim());
}

/// `git rev-parse --short=12 HEAD`, with `-dirty` when tracked files changed;
/// `None` when git or the checkout is missing.
fn git_revision() -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let rev = git(&["rev-parse", "--short=12", "HEAD"])?;
    // Rebuild when HEAD moves (a commit, a checkout), in a worktree too.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/index");
    }
    if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
        println!("cargo:rerun-if-changed={common}/refs/heads");
        println!("cargo:rerun-if-changed={common}/packed-refs");
    }
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{rev}-dirty") } else { rev })
}
