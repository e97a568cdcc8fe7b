/* The two halves of a decode step's work, as plain loops for the C compiler to vectorise.
   Both stream memory once, in order: every weight row, every cached key and value. */
#include <math.h>
#include <stdint.h>

/* out[r, o] = bias[o] + sum_i weight[o, i] * x[r, i] for a few rows r: each weight row is read
   once for all of them. weight: (n_out, n_in) row-major; bias may be NULL. */
void linear(const float *x, const float *weight, const float *bias, float *out,
            int64_t rows, int64_t n_in, int64_t n_out) {
    for (int64_t o = 0; o < n_out; o++) {
        const float *w = weight + o * n_in;
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * n_in;
            float sum = 0.0f;
            #pragma omp simd reduction(+:sum)
            for (int64_t i = 0; i < n_in; i++) sum += w[i] * xr[i];
            out[r * n_out + o] = sum + (bias ? bias[o] : 0.0f);
        }
    }
}

/* Softmax attention of one query per (batch, head) to t keys, all visible. q and out: (B, H, d);
   head bh's keys and values are t rows of d floats from k + bh * head_stride (the filled part of
   a KV cache buffer). ALiBi (slopes non-NULL) subtracts slope * distance from each score.
   scores: t floats of scratch. */
void attend_one(const float *q, const float *k, const float *v, float *out, float *scores,
                int64_t batch, int64_t heads, int64_t t, int64_t d, int64_t head_stride,
                float scale, const float *slopes) {
    for (int64_t bh = 0; bh < batch * heads; bh++) {
        const float *qh = q + bh * d, *kh = k + bh * head_stride, *vh = v + bh * head_stride;
        float slope = slopes ? slopes[bh % heads] : 0.0f, top = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < t; j++) {
            const float *key = kh + j * d;
            float dot = 0.0f;
            #pragma omp simd reduction(+:dot)
            for (int64_t i = 0; i < d; i++) dot += qh[i] * key[i];
            scores[j] = dot * scale - slope * (float)(t - 1 - j);
            top = scores[j] > top ? scores[j] : top;
        }
        for (int64_t j = 0; j < t; j++) {
            scores[j] = expf(scores[j] - top);  /* minus the maximum: no overflow */
            total += scores[j];
        }
        float *o = out + bh * d;
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
        for (int64_t j = 0; j < t; j++) {
            const float *value = vh + j * d, p = scores[j] / total;
            #pragma omp simd
            for (int64_t i = 0; i < d; i++) o[i] += p * value[i];
        }
    }
}
