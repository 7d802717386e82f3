//! The one size limit of every model the crate builds (BAR, TAR, DT).
//!
//! A configuration names dimensions; the weights are their products. Each
//! dimension is bounded on its own, but products of bounded dimensions can
//! still ask for terabytes, and an allocation that large aborts the process
//! instead of returning an error. So every configuration's `validate`
//! also bounds the total, computed with checked arithmetic from the same
//! tensor shapes the model allocates.
//!
//! A model under the limit that still does not fit in the machine's memory
//! aborts like any Rust allocation: the limit keeps a typo in a dimension
//! from taking the process down, it does not measure free memory.

/// The most weights (f32 values, summed over all tensors) a model may have:
/// 2^30, i.e. 4 GiB of f32, a thousand times the default BAR model (the
/// layers keep a transposed copy too, so up to twice that in memory).
pub const MAX_MODEL_PARAMETERS: usize = 1 << 30;

/// The number of weights in tensors of these shapes, or `None` when it
/// overflows `usize` or exceeds [`MAX_MODEL_PARAMETERS`].
pub(crate) fn checked_parameter_count<'a>(
    shapes: impl IntoIterator<Item = &'a [usize]>,
) -> Option<usize> {
    let mut total = 0usize;
    for shape in shapes {
        let len = shape
            .iter()
            .try_fold(1usize, |acc, &dim| acc.checked_mul(dim))?;
        total = total.checked_add(len)?;
    }
    (total <= MAX_MODEL_PARAMETERS).then_some(total)
}

/// The weights in tensors of these `(name, shape)`s, or the message a
/// configuration's `validate` reports when they are too many.
pub(crate) fn check_model_size(shapes: &[(String, Vec<usize>)]) -> Result<usize, String> {
    checked_parameter_count(shapes.iter().map(|(_, shape)| shape.as_slice())).ok_or_else(|| {
        format!(
            "the dimensions ask for more than {MAX_MODEL_PARAMETERS} weights \
             (nann::MAX_MODEL_PARAMETERS)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_refuses_what_it_should() {
        let shapes: [&[usize]; 3] = [&[3, 4], &[4], &[]];
        assert_eq!(checked_parameter_count(shapes), Some(3 * 4 + 4 + 1));
        let at_limit: [&[usize]; 1] = [&[1 << 15, 1 << 15]];
        assert_eq!(checked_parameter_count(at_limit), Some(1 << 30));
        let over: [&[usize]; 2] = [&[1 << 15, 1 << 15], &[1]];
        assert_eq!(checked_parameter_count(over), None);
        let overflows: [&[usize]; 1] = [&[usize::MAX, 2]];
        assert_eq!(checked_parameter_count(overflows), None);
        let sum_overflows: [&[usize]; 2] = [&[usize::MAX], &[1]];
        assert_eq!(checked_parameter_count(sum_overflows), None);
    }
}
