"""STUB (owner: kernels helper): input validation for optimum_atb.ops."""


def _noop(*args, **kwargs):
    return None


check_flash_attention = check_paged_attention = check_reshape_and_cache = _noop
check_norm = check_rotary = check_glu = _noop
