# CUDA MPS for the jobs of one device call (sourced: `source results/studies/mps.sh; mps_start; ...; mps_stop`).
# Without MPS, processes sharing a GPU run in time slices, one context at a time; small models then leave
# most SMs idle in every slice. With the MPS daemon their kernels run side by side. It changes no device
# setting (compute mode stays as it is) and ends with the call. Where the daemon is missing or does not
# start, the jobs run as before and a line says so.
mps_start() {
  if ! command -v nvidia-cuda-mps-control >/dev/null; then
    echo "MPS: nvidia-cuda-mps-control is not installed; jobs share the GPU in time slices"; return 0
  fi
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    echo "MPS: daemon started"
  else
    echo "MPS: the daemon did not start; jobs share the GPU in time slices"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
}

mps_stop() {
  [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && echo quit | nvidia-cuda-mps-control && echo "MPS: daemon stopped"
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  return 0
}
