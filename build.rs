//! Stamps the binary with the git revision it was built from, for
//! `portcullis --version`. Outside a git checkout (the container build,
//! whose context leaves `.git` out, or a source tarball) the revision is
//! taken from `PORTCULLIS_GIT_REV` when set, else reported as unknown.
//!
//! The script reruns only when HEAD moves (a commit or a checkout on this
//! branch), never on index or working-tree changes: a rerun rebuilds the
//! crate, and `git status` itself rewrites the index.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PORTCULLIS_GIT_REV");
    let revision = std::env::var("PORTCULLIS_GIT_REV").ok().filter(|r| !r.trim().is_empty()).or_else(git_revision);
    println!("cargo:rustc-env=PORTCULLIS_GIT_REV={}", revision.as_deref().unwrap_or("unknown").trim());
}

/// `git rev-parse --short=12 HEAD`; `None` when git or the checkout is missing.
fn git_revision() -> Option<String> {
    let rev = git(&["rev-parse", "--short=12", "HEAD"])?;
    // HEAD itself (a checkout), the branch it names (a commit), and
    // packed-refs (where the branch may live): exact files, so commits on
    // other branches of a shared repository do not rerun this. Only files
    // that exist: cargo treats a missing one as always changed.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD", branch.as_deref().unwrap_or("HEAD"), "packed-refs"] {
        let Some(path) = git(&["rev-parse", "--git-path", name]) else { continue };
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(rev)
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
