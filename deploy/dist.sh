#!/usr/bin/env bash
# Builds modi's release artefacts for x86_64 Linux, glibc 2.17 and newer:
#
#   deploy/dist.sh [OUT]     (default OUT: target/dist, in $CARGO_TARGET_DIR if set)
#
# 1. installs what it needs if missing: zig (PyPI `ziglang`),
#    cargo-zigbuild and cargo-deb (crates.io, `cargo install --locked`);
# 2. builds `modi` and `modi-agent` once, with the `dist` profile (release,
#    stripped), linked by zig against glibc 2.17 symbols
#    (target x86_64-unknown-linux-gnu.2.17); cargo skips what is up to date;
# 3. checks neither binary needs a glibc symbol newer than 2.17;
# 4. packs OUT/modi-VERSION-x86_64-linux-gnu.tar.gz and
#    OUT/modi-agent-VERSION-x86_64-linux-gnu.tar.gz (binary, systemd unit
#    for /usr/local/bin, README), OUT/modi_VERSION-1_amd64.deb and
#    OUT/modi-agent_VERSION-1_amd64.deb (from the same binaries), and
#    OUT/SHA256SUMS over all four.
#
# Other targets (aarch64, musl) need their own `--target` here, their own
# glibc floor check, and a controller that serves one agent per
# architecture; see docs/operations.md.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-gnu
GLIBC=2.17
PROFILE=dist
TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT=${1:-$TARGET_DIR/dist}

say() { printf 'dist: %s\n' "$*"; }

# ---- tools ------------------------------------------------------------------
ZIGLANG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.1
CARGO_DEB_VERSION=3.8.0
if ! python3 -c "import ziglang" 2>/dev/null; then
    say "installing zig (PyPI ziglang==$ZIGLANG_VERSION)"
    python3 -m pip install --quiet "ziglang==$ZIGLANG_VERSION"
fi
if ! cargo-zigbuild --version 2>/dev/null | grep -q "$CARGO_ZIGBUILD_VERSION"; then
    say "installing cargo-zigbuild $CARGO_ZIGBUILD_VERSION"
    cargo install --locked --quiet cargo-zigbuild --version "$CARGO_ZIGBUILD_VERSION"
fi
if ! cargo-deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    say "installing cargo-deb $CARGO_DEB_VERSION"
    cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION"
fi

# ---- build once ---------------------------------------------------------------
say "building modi and modi-agent for $TARGET, glibc $GLIBC"
start=$(date +%s)
cargo zigbuild --locked --profile "$PROFILE" --target "$TARGET.$GLIBC" \
    -p modi-controller -p modi-agent --bins
say "built in $(($(date +%s) - start)) s"
BIN_DIR=$TARGET_DIR/$TARGET/$PROFILE
VERSION=$("$BIN_DIR/modi" --version | cut -d' ' -f2)

# ---- glibc floor ---------------------------------------------------------------
for bin in modi modi-agent; do
    newest=$(objdump -T "$BIN_DIR/$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' |
        sort -t. -k1,1n -k2,2n -k3,3n | tail -1)
    if [ "$(printf '%s\n%s\n' "$newest" "$GLIBC" | sort -t. -k1,1n -k2,2n -k3,3n | tail -1)" != "$GLIBC" ]; then
        echo "dist: $bin needs GLIBC_$newest, newer than $GLIBC" >&2
        exit 1
    fi
    say "$bin: $(stat -c %s "$BIN_DIR/$bin") bytes, newest glibc symbol GLIBC_$newest"
done

# ---- tarballs ------------------------------------------------------------------
# Reproducible archives: every file dated by the last commit. Set only now:
# build scripts that watch SOURCE_DATE_EPOCH would rebuild at every commit.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
rm -rf "$OUT"
mkdir -p "$OUT"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pack() { # pack NAME UNIT README
    local name=$1 unit=$2 readme=$3 dir="$stage/$1-$VERSION"
    mkdir -p "$dir"
    install -m 0755 "$BIN_DIR/$name" "$dir/$name"
    sed "s|/usr/bin/$name|/usr/local/bin/$name|" "deploy/systemd/$unit" >"$dir/$unit"
    chmod 0644 "$dir/$unit"
    install -m 0644 "$readme" "$dir/README.md"
    tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
        -C "$stage" -cf - "$name-$VERSION" | gzip -n -9 >"$OUT/$name-$VERSION-x86_64-linux-gnu.tar.gz"
}
pack modi modi.service README.md
pack modi-agent modi-agent.service agent/README.md

# ---- packages (the same binaries) ----------------------------------------------
for pkg in modi-controller modi-agent; do
    cargo deb --no-build --no-strip --quiet --locked --profile "$PROFILE" --target "$TARGET" \
        -p "$pkg" -o "$OUT"
done

(cd "$OUT" && sha256sum -- *.tar.gz *.deb >SHA256SUMS)
say "artefacts in $OUT:"
(cd "$OUT" && ls -l -- *.tar.gz *.deb SHA256SUMS | awk '{printf "  %-45s %10d bytes\n", $9, $5}')
