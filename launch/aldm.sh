#!/usr/bin/env bash
# ALDM with Stable Diffusion 1.5 on real data (configs/aldm.py), on a TPU pod slice or a SLURM GPU cluster.
#
#   launch/aldm.sh DATASET prepare        # once, on one machine that sees the shared filesystem
#   launch/aldm.sh DATASET tpu  [flags]   # every worker of $TPU_NAME (launch/tpu_pod.sh)
#   launch/aldm.sh DATASET slurm [flags]  # sbatch launch/gpu_slurm.sbatch (8 GPUs per node; NODES nodes)
# DATASET: ade20k, cityscapes or folder. Extra flags go to sdsup.train (e.g. --config.input.batch_size=16).
#
# Where things are (a shared filesystem every host mounts; a GCS bucket mounted with gcsfuse works too):
#   SD_PIPELINE  a diffusers Stable Diffusion 1.5 directory (model_index.json, unet/, vae/, ...)   [prepare]
#   CSAIL_DIR    encoder_epoch_50.pth + decoder_epoch_50.pth of CSAIL's ade20k-resnet101-upernet [prepare];
#                for cityscapes also ALDM's 20-row head decoder_epoch_50_20cls.pth (19 classes + fake)
#   ROOT         everything written: ROOT/sd15 (imported SD), ROOT/segmenters, ROOT/tfds, ROOT/workdirs
#   DATA         the dataset's files (docs/data.md), CAPTIONS its caption JSON(s), comma-separated
# `prepare` imports SD, converts the segmenters and builds the dataset (the `data` stage); the training
# hosts then only read ROOT. DRY_RUN=1 prints every command instead of running it.
set -euo pipefail
dataset=${1:-}
action=${2:-}
case "$dataset" in ade20k | cityscapes | folder) ;; *)
  echo "usage: $0 ade20k|cityscapes|folder prepare|tpu|slurm [sdsup.train flags]" >&2
  exit 2
  ;;
esac
shift 2 || true
: "${ROOT:?set ROOT (a shared directory for models, data and workdirs)}" "${DATA:?set DATA (the dataset files)}"
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${@@Q}"; else "$@"; fi; }

SEG="$ROOT/segmenters"
flags=(
  --config="configs/aldm.py:$dataset" --workdir="$ROOT/workdirs/aldm_$dataset"
  --config.pretrained="$ROOT/sd15" --config.data.path="$DATA" --config.data.data_dir="$ROOT/tfds"
)
[[ -n "${CAPTIONS:-}" ]] && flags+=(--config.data.captions="$CAPTIONS")
if [[ "$dataset" != folder ]]; then
  # The paper's discriminator starts from CSAIL's ADE20K UperNet-R101 (151 outputs; Cityscapes: ALDM's
  # 20-row head); ADE20K's evaluator is that network without the fake row, Cityscapes' DRN-D-105
  # (EVALUATOR: its converted directory).
  flags+=(--config.control.discriminator_init="$SEG/discriminator_$dataset")
  [[ "$dataset" == ade20k ]] && flags+=(--config.evalseg.pretrained="$SEG/upernet101_ade20k")
  [[ "$dataset" == cityscapes && -n "${EVALUATOR:-}" ]] && flags+=(--config.evalseg.pretrained="$EVALUATOR")
fi

case "$action" in
  prepare)
    : "${SD_PIPELINE:?set SD_PIPELINE (a diffusers Stable Diffusion 1.5 directory)}"
    run "$PYTHON" -m sdsup.convert import --pretrained="$SD_PIPELINE" --out="$ROOT/sd15"
    if [[ "$dataset" != folder ]]; then
      : "${CSAIL_DIR:?set CSAIL_DIR (encoder_epoch_50.pth, decoder_epoch_50.pth)}"
      if [[ "$dataset" == ade20k ]]; then  # ADE20K's 150-class head plus a zero-initialised "fake" row
        head=(--decoder="$CSAIL_DIR/decoder_epoch_50.pth" --fake_class)
      else  # ALDM's Cityscapes head already holds the fake row; that network sees [-1, 1] pixels
        head=(--decoder="$CSAIL_DIR/decoder_epoch_50_20cls.pth" --image_mean=0.5,0.5,0.5 --image_std=0.5,0.5,0.5)
      fi
      run "$PYTHON" -m sdsup.convert csail --encoder="$CSAIL_DIR/encoder_epoch_50.pth" "${head[@]}" \
        --out="$SEG/discriminator_$dataset"
      if [[ "$dataset" == ade20k ]]; then
        run "$PYTHON" -m sdsup.convert csail --encoder="$CSAIL_DIR/encoder_epoch_50.pth" \
          --decoder="$CSAIL_DIR/decoder_epoch_50.pth" --out="$SEG/upernet101_ade20k"
      fi
    fi
    run "$PYTHON" -m sdsup.train "${flags[@]}" --only=data "$@"
    ;;
  tpu)
    "$HERE/tpu_pod.sh" train "${flags[@]}" "$@"  # it prints instead of running under DRY_RUN=1 itself
    ;;
  slurm)
    run env CONFIG="configs/aldm.py:$dataset" WORKDIR="$ROOT/workdirs/aldm_$dataset" \
      sbatch --nodes="${NODES:-1}" "$HERE/gpu_slurm.sbatch" "${flags[@]:2}" "$@"
    ;;
  *)
    echo "usage: $0 $dataset prepare|tpu|slurm [sdsup.train flags]" >&2
    exit 2
    ;;
esac
