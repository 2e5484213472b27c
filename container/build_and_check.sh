#!/bin/sh
# Builds the inference image from ./Dockerfile without a Docker engine or an image registry
# (buildah, podman) and runs it as the FLARE organisers do, one case at a time, on generated
# cases and on the real CT of ../shared/data/images. Every output must equal the local
# ./predict.sh's output voxel for voxel, with the same geometry. Prints timings and the image size;
# exits 1 on any difference or failure.
#
#   container/build_and_check.sh
#
# Needs root, Debian's buildah, podman, runc and debootstrap, .venv (make test makes it) and
# network access to PyPI for the build. Settings (environment):
#   TENSORFLOW     TensorFlow requirement of the image (default tensorflow-cpu==2.21.0;
#                  tensorflow[and-cuda]==2.21.0 builds the GPU image, which then runs on the CPU)
#   IMAGE          tag of the built image (default localhost/efficientscn:cpu, or :gpu)
#   BASE_IMAGE     base image in the local storage (default: made by container/make_base.sh)
#   SHARED_IMAGES  folder of real NAME_0000.nii.gz images (default ../shared/data/images)
#   PIP_CERT       CA bundle that pip needs to reach PyPI (e.g. behind a TLS-intercepting proxy);
#                  given to the build as the secret pip_cert, never stored in the image
#   FORCE=1        rebuild the base image and the image without the layer cache (for timings)
#   KEEP=1         keep the work folder (inputs, outputs, logs) and print where it is
set -eu

cd "$(dirname "$0")/.."
repo=$(pwd)
tensorflow=${TENSORFLOW:-tensorflow-cpu==2.21.0}
case "$tensorflow" in
    *and-cuda*) variant=gpu ;;
    *) variant=cpu ;;
esac
image=${IMAGE:-localhost/efficientscn:$variant}
shared_images=${SHARED_IMAGES:-$repo/../shared/data/images}
python=$repo/.venv/bin/python
# What this machine needs beyond the organisers' command: runc (crun fails on the hybrid cgroups
# here), limits on open files and processes under this machine's hard limits (podman's defaults
# are above them: "error setting rlimit type 7"), and no network, to show that none is needed.
podman_run() {
    podman --runtime runc run --rm --network none \
        --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 "$@"
}

say() { printf '== %s\n' "$*"; }
die() { printf 'build_and_check: error: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v start="$1" -v end="$(now)" 'BEGIN { printf "%.1f", end - start }'; }

[ "$(id -u)" -eq 0 ] || die "run as root (buildah and podman keep images in root's storage here)"
for tool in buildah podman runc; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "$tool not found: apt-get install buildah podman runc debootstrap"
done
[ -x "$python" ] || die "$python not found: make the development environment first (make test)"

work=$(mktemp -d "${TMPDIR:-/var/tmp}/build_and_check.XXXXXX")
container_name=efficientscn-check-$$
cleanup() {
    podman rm --force --ignore "$container_name" >/dev/null 2>&1 || true
    if [ "${KEEP:-0}" = 1 ]; then
        echo "work folder kept: $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "pins: container/requirements-runtime.txt against app/'s imports and constraints.txt"
"$python" container/check_pins.py

# --- base image --------------------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=localhost/flare-base:bookworm-python3.11
    if [ "${FORCE:-0}" != 1 ] && buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
        base_seconds="cached"
    else
        start=$(now)
        container/make_base.sh "$BASE_IMAGE"
        base_seconds="$(since "$start") s"
    fi
else
    buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1 ||
        die "BASE_IMAGE $BASE_IMAGE is not in the local image storage (nothing can be pulled here)"
    base_seconds="given"
fi

# --- image -------------------------------------------------------------------------------------
say "build $image: BASE_IMAGE=$BASE_IMAGE TENSORFLOW=$tensorflow (log: build.log)"
previous=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
# --layers keeps a layer cache: a rebuild after a change of app/ or weights/ reuses the pip layer.
set -- --isolation chroot --layers --force-rm --pull=false \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TENSORFLOW=$tensorflow" --tag "$image"
if [ -n "${PIP_CERT:-}" ]; then
    [ -r "$PIP_CERT" ] || die "PIP_CERT=$PIP_CERT is not a readable file"
    set -- "$@" --secret "id=pip_cert,src=$PIP_CERT"
fi
if [ "${FORCE:-0}" = 1 ]; then
    set -- "$@" --no-cache
fi
start=$(now)
if ! buildah bud "$@" . >"$work/build.log" 2>&1; then
    tail -n 30 "$work/build.log" >&2
    die "the build failed (end of its log above)"
fi
build_seconds=$(since "$start")
current=$(podman image inspect --format '{{.Id}}' "$image")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    # The image this tag named before is untagged now: remove it, and the cached layers that only
    # it used, rather than leave them dangling.
    podman rmi "$previous" >/dev/null 2>&1 || true
    podman image prune --force >/dev/null 2>&1 || true
fi
image_mb=$(podman image inspect --format '{{.Size}}' "$image" | awk '{ printf "%.0f", $1 / 1e6 }')
say "built in $build_seconds s: $image, $image_mb MB"

say "contents: /workspace and the Python packages of the image"
listing=$(podman_run "$image" /bin/bash -c 'ls -A /workspace | tr "\n" " "')
[ "$listing" = "app predict.sh weights " ] ||
    die "/workspace holds '$listing', not only app predict.sh weights"
podman_run "$image" python3 -m pip list --format=freeze --disable-pip-version-check \
    >"$work/installed.txt"
"$python" container/check_pins.py --installed "$work/installed.txt" --tensorflow "$tensorflow"
start=$(now)
podman_run "$image" true
start_seconds=$(since "$start")
start=$(now)
podman_run "$image" python3 -c "import tensorflow, keras, SimpleITK" 2>"$work/import.log"
import_seconds=$(since "$start")
start=$(now)
"$python" -c "import tensorflow, keras, SimpleITK" 2>/dev/null
local_import_seconds=$(since "$start")
say "start: an empty container $start_seconds s; importing TensorFlow, Keras and SimpleITK" \
    "$import_seconds s in a container, $local_import_seconds s locally"

# --- cases -------------------------------------------------------------------------------------
say "cases: two generated (96 and 128 voxels in-plane) and the real CT of $shared_images"
mkdir "$work/cases"
for in_plane in 96 128; do
    # Writes generatedN_0000_0000.nii.gz (the image) and generatedN_0000.nii.gz (its label).
    "$python" -m synthetic --out "$work/generated" --cases 1 --seed "$in_plane" \
        --prefix "generated$in_plane" --in-plane-size "$in_plane" \
        --max-voxels $((in_plane * in_plane * 80)) >/dev/null
    cp "$work/generated/generated${in_plane}_0000_0000.nii.gz" "$work/cases/"
done
if [ -d "$shared_images" ]; then
    for image_file in "$shared_images"/*_0000.nii.gz; do
        if [ -e "$image_file" ]; then
            cp "$image_file" "$work/cases/"
        fi
    done
else
    say "WARNING: $shared_images not found: generated cases only"
fi

failures=0
results=$work/results.txt
for image_file in "$work"/cases/*_0000.nii.gz; do
    name=$(basename "$image_file" _0000.nii.gz)
    case_dir=$work/runs/$name
    # Like the organisers: a fresh inputs folder with this one image, an empty outputs folder.
    mkdir -p "$case_dir/inputs" "$case_dir/outputs"
    cp "$image_file" "$case_dir/inputs/"
    start=$(now)
    status=0
    (cd "$case_dir" && podman_run --name "$container_name" \
        -v "$PWD/inputs/:/workspace/inputs/" -v "$PWD/outputs/:/workspace/outputs/" \
        "$image" /bin/bash -c "sh predict.sh") >"$case_dir/container.log" 2>&1 || status=$?
    container_seconds=$(since "$start")
    start=$(now)
    ./predict.sh "$case_dir/inputs" "$case_dir/local" --quiet >"$case_dir/local.log" 2>&1 ||
        { tail -n 20 "$case_dir/local.log" >&2; die "$name: the local ./predict.sh failed"; }
    local_seconds=$(since "$start")
    if [ "$status" -ne 0 ]; then
        tail -n 20 "$case_dir/container.log" >&2
        echo "$name: FAILED: the container exited with $status (end of its log above)"
        failures=$((failures + 1))
        verdict=FAILED
    elif "$python" container/compare_outputs.py "$case_dir/outputs" "$case_dir/local"; then
        verdict=identical
    else
        failures=$((failures + 1))
        verdict=DIFFERENT
    fi
    size=$("$python" -c 'import sys, SimpleITK as s
r = s.ImageFileReader()
r.SetFileName(sys.argv[1])
r.ReadImageInformation()
print("x".join(map(str, r.GetSize())))' "$image_file")
    printf '%-20s %-13s %12s %12s  %s\n' "$name" "$size" "$container_seconds" "$local_seconds" \
        "$verdict" >>"$results"
done

# --- summary -----------------------------------------------------------------------------------
echo
say "summary ($(nproc) CPU cores; seconds are wall-clock, one process per case)"
echo "base image:  $base_seconds ($BASE_IMAGE)"
echo "image build: $build_seconds s ($image, TENSORFLOW=$tensorflow)"
echo "image size:  $image_mb MB"
echo "start:       empty container $start_seconds s; imports of app/ $import_seconds s in a" \
    "container, $local_import_seconds s locally"
printf '%-20s %-13s %12s %12s  %s\n' case "size (xyz)" "container s" "local s" output
cat "$results"
if [ "$failures" -ne 0 ]; then
    echo "FAILED: $failures case(s) differ from the local predict.sh or did not run"
    exit 1
fi
echo "OK: the image's outputs equal the local predict.sh's for every case"
