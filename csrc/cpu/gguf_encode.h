// CPU encoders for GGUF block formats: llama.cpp's reference quantizers (ggml-quants.c quantize_row_*_ref and,
// with importance weights, quantize_row_*_impl), re-expressed block by block with the same float32 operation order,
// so the bytes equal llama.cpp's and qkernels/reference/gguf.py's. Sums run left to right from 0.0f; sqrtf and
// divisions are IEEE (this file must not be built with -ffast-math or FMA contraction: see setup.py).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "qkernels/gguf.h"

namespace qkernels {
namespace gguf {

constexpr float kGroupMaxEps = 1e-15f;

// round half to even, valid for |v| < 2^22 (ggml's nearest_int)
inline int nearest_int(float v) { return (int)std::nearbyint(v); }

inline void store_fp16(uint8_t* p, float v) {
  const uint16_t h = fp32_to_fp16(v);
  p[0] = (uint8_t)(h & 0xFF);
  p[1] = (uint8_t)(h >> 8);
}

inline float fp16_round(float v) { return fp16_to_fp32(fp32_to_fp16(v)); }

// largest |x| and the signed value at its first occurrence
inline void abs_max(const float* x, int n, float* amax, float* max) {
  *amax = 0.f;
  *max = 0.f;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > *amax) {
      *amax = ax;
      *max = x[i];
    }
  }
}

// make_qkx2_quants / make_qkx3_quants: asymmetric codes in [0, nmax] with x ~= scale * L - the_min.
inline float search_qkx(int n, int nmax, const float* x, const float* w, uint8_t* L, float* the_min, float rmin,
                        float rdelta, int nstep, bool use_mad) {
  float mn = x[0], mx = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < mn) mn = x[i];
    if (x[i] > mx) mx = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (mn > 0) mn = 0;
  if (mx <= mn) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -mn;
    return 0.f;
  }
  float iscale = nmax / (mx - mn);
  float scale = 1 / iscale;
  float best = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * (x[i] - mn));
    L[i] = (uint8_t)(l < 0 ? 0 : (l > nmax ? nmax : l));
    float diff = scale * L[i] + mn - x[i];
    diff = use_mad ? std::fabs(diff) : diff * diff;
    best += w[i] * diff;
  }
  uint8_t La[256];
  for (int s = 0; s <= nstep; ++s) {
    iscale = (rmin + rdelta * s + nmax) / (mx - mn);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * (x[i] - mn));
      l = l < 0 ? 0 : (l > nmax ? nmax : l);
      La[i] = (uint8_t)l;
      const float wl = w[i] * l;
      sum_l += wl;
      sum_l2 += wl * l;
      sum_xl += wl * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * La[i] + this_min - x[i];
        diff = use_mad ? std::fabs(diff) : diff * diff;
        cur += w[i] * diff;
      }
      if (cur < best) {
        memcpy(L, La, n);
        best = cur;
        scale = this_scale;
        mn = this_min;
      }
    }
  }
  *the_min = -mn;
  return scale;
}

// make_qx_quants, rmse_type 1: symmetric codes L in [0, 2 nmax - 1] (value L - nmax); weights qw or x^2.
inline float search_qx(int n, int nmax, const float* x, int8_t* L, const float* qw) {
  float amax, mx;
  abs_max(x, n, &amax, &mx);
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / mx;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * x[i]);
    l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
    L[i] = (int8_t)(l + nmax);
    const float w = qw ? qw[i] : x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int s = -9; s <= 9; ++s) {
    if (s == 0) continue;
    iscale = -(nmax + 0.1f * s) / mx;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * x[i]);
      l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
      const float w = qw ? qw[i] : x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        L[i] = (int8_t)(nmax + (l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l)));
      }
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// make_qp_quants: unsigned codes in [0, nmax] for non-negative x (the K-quant sub-block scales) with weights qw.
inline float search_qp(int n, int nmax, const float* x, uint8_t* L, const float* qw) {
  float mx = 0;
  for (int i = 0; i < n; ++i) mx = mx > x[i] ? mx : x[i];
  if (mx < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = nmax / mx;
  for (int i = 0; i < n; ++i) L[i] = (uint8_t)nearest_int(iscale * x[i]);
  const float scale = 1 / iscale;
  float best = 0;
  for (int i = 0; i < n; ++i) {
    const float diff = x[i] - scale * L[i];
    best += qw[i] * diff * diff;
  }
  for (int s = -4; s <= 4; ++s) {
    if (s == 0) continue;
    const float isc = (0.1f * s + nmax) / mx;
    const float sc = 1 / isc;
    float mse = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(isc * x[i]);
      l = l < nmax ? l : nmax;
      const float diff = x[i] - sc * l;
      mse += qw[i] * diff * diff;
    }
    if (mse < best) {
      best = mse;
      iscale = isc;
    }
  }
  float sumlx = 0, suml2 = 0;
  int Li[256];
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * x[i]);
    l = l < nmax ? l : nmax;
    Li[i] = l;
    sumlx += qw[i] * x[i] * l;
    suml2 += qw[i] * l * l;
  }
  for (int t = 0; t < 5; ++t) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = qw[i];
      float slx = sumlx - w * x[i] * Li[i];
      float sl2 = suml2 - w * Li[i] * Li[i];
      if (slx > 0 && sl2 > 0) {
        int nl = nearest_int(x[i] * sl2 / slx);
        nl = nl < nmax ? nl : nmax;
        if (nl != Li[i]) {
          slx += w * x[i] * nl;
          sl2 += w * nl * nl;
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            Li[i] = nl;
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (!changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = (uint8_t)Li[i];
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// make_q3_quants(do_rmse = true): symmetric codes in [0, 2 nmax - 1] (value L - nmax), weights x^2, least-squares
// scale refined by up to 5 coordinate-descent sweeps.
inline float search_q3(int n, int nmax, const float* x, int8_t* L) {
  float amax, mx;
  abs_max(x, n, &amax, &mx);
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  const float iscale = -nmax / mx;
  float sumlx = 0, suml2 = 0;
  int Li[256];
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * x[i]);
    l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
    Li[i] = l;
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  for (int t = 0; t < 5; ++t) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float slx = sumlx - w * x[i] * Li[i];
      if (slx > 0) {
        float sl2 = suml2 - w * Li[i] * Li[i];
        int nl = nearest_int(x[i] * sl2 / slx);
        nl = nl < -nmax ? -nmax : (nl > nmax - 1 ? nmax - 1 : nl);
        if (nl != Li[i]) {
          slx += w * x[i] * nl;
          sl2 += w * nl * nl;
          if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
            Li[i] = nl;
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (!changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = (int8_t)(Li[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// ---- block encoders (x: block_size floats, qw: matching importance weights or nullptr) ---------------------------

inline void encode_q8_0(const float* x, uint8_t* y) {
  float amax = 0.f;
  for (int j = 0; j < 32; ++j) amax = amax > std::fabs(x[j]) ? amax : std::fabs(x[j]);
  const float d = amax / 127;
  const float id = d ? 1.0f / d : 0.0f;
  store_fp16(y, d);
  for (int j = 0; j < 32; ++j) y[2 + j] = (uint8_t)(int8_t)std::round(x[j] * id);  // roundf: half away from 0
}

// Q4_0 (nmax 8) and Q5_0 (nmax 16): d = max / -nmax, q = min(2 nmax - 1, (int)(x / d + nmax + 0.5)).
inline float encode_sym(const float* x, int nmax, int* q) {
  float amax, mx;
  abs_max(x, 32, &amax, &mx);
  const float d = mx / -nmax;
  const float id = d ? 1.0f / d : 0.0f;
  const float off = nmax + 0.5f;
  for (int j = 0; j < 32; ++j) {
    const int v = (int)(x[j] * id + off);  // truncation toward zero, like (int8_t)(x0 + 8.5f)
    q[j] = v < 0 ? 0 : (v > 2 * nmax - 1 ? 2 * nmax - 1 : v);
  }
  return d;
}

inline void encode_asym(const float* x, int nmax, int* q, float* d_out, float* m_out) {
  float mn = x[0], mx = x[0];
  for (int j = 1; j < 32; ++j) {
    mn = x[j] < mn ? x[j] : mn;
    mx = x[j] > mx ? x[j] : mx;
  }
  const float d = (mx - mn) / nmax;
  const float id = d ? 1.0f / d : 0.0f;
  for (int j = 0; j < 32; ++j) {
    const int v = (int)((x[j] - mn) * id + 0.5f);
    q[j] = v < 0 ? 0 : (v > nmax ? nmax : v);
  }
  *d_out = d;
  *m_out = mn;
}

inline void put_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = (uint8_t)(v >> (8 * i));
}

inline void encode_q4_0(const float* x, uint8_t* y) {
  int q[32];
  store_fp16(y, encode_sym(x, 8, q));
  for (int j = 0; j < 16; ++j) y[2 + j] = (uint8_t)(q[j] | (q[j + 16] << 4));
}

inline void encode_q5_0(const float* x, uint8_t* y) {
  int q[32];
  store_fp16(y, encode_sym(x, 16, q));
  uint32_t qh = 0;
  for (int j = 0; j < 32; ++j) qh |= (uint32_t)(q[j] >> 4) << j;
  put_u32(y + 2, qh);
  for (int j = 0; j < 16; ++j) y[6 + j] = (uint8_t)((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
}

inline void encode_q4_1(const float* x, uint8_t* y) {
  int q[32];
  float d, m;
  encode_asym(x, 15, q, &d, &m);
  store_fp16(y, d);
  store_fp16(y + 2, m);
  for (int j = 0; j < 16; ++j) y[4 + j] = (uint8_t)(q[j] | (q[j + 16] << 4));
}

inline void encode_q5_1(const float* x, uint8_t* y) {
  int q[32];
  float d, m;
  encode_asym(x, 31, q, &d, &m);
  store_fp16(y, d);
  store_fp16(y + 2, m);
  uint32_t qh = 0;
  for (int j = 0; j < 32; ++j) qh |= (uint32_t)(q[j] >> 4) << j;
  put_u32(y + 4, qh);
  for (int j = 0; j < 16; ++j) y[8 + j] = (uint8_t)((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
}

inline void encode_mxfp4(const float* x, uint8_t* y) {
  float amax = 0.f;
  for (int j = 0; j < 32; ++j) amax = amax < std::fabs(x[j]) ? std::fabs(x[j]) : amax;
  // floorf(log2f(amax)) with a correctly rounded float log2 (through double), like np.log2 and glibc's log2f
  int e = 0;
  if (amax > 0.0f) {
    const float lg = (float)std::log2((double)amax);
    const float v = std::floor(lg) - 2 + 127;
    e = v < 0 ? 0 : (v > 255 ? 255 : (int)v);
  }
  const float d = e8m0_to_fp32_half((uint8_t)e);
  y[0] = (uint8_t)e;
  int q[32];
  for (int j = 0; j < 32; ++j) {
    int best_i = 0;
    float best = std::fabs(mxfp4_value(0) * d - x[j]);
    for (int i = 1; i < 16; ++i) {
      const float err = std::fabs(mxfp4_value(i) * d - x[j]);
      if (err < best) {
        best = err;
        best_i = i;
      }
    }
    q[j] = best_i;
  }
  for (int j = 0; j < 16; ++j) y[1 + j] = (uint8_t)(q[j] | (q[j + 16] << 4));
}

inline void pack_scale_min_k4(const uint8_t* ls, const uint8_t* lm, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
    s[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
    s[j + 8] = (uint8_t)((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
  }
}

// Q4_K (nmax 15) and Q5_K (nmax 31): codes L[256], d/dmin and the 12 scale bytes written to y.
inline void encode_q45_k(const float* x, const float* qw, int nmax, uint8_t* y, uint8_t* L) {
  float scales[8], mins[8], weights[32];
  uint8_t ls[8], lm[8];
  float dv, mv;
  if (!qw) {
    for (int j = 0; j < 8; ++j) {
      const float* xs = x + 32 * j;
      float sum_x2 = 0;
      for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
      const float av_x = std::sqrt(sum_x2 / 32);
      for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xs[l]);
      scales[j] = nmax == 15 ? search_qkx(32, 15, xs, weights, L + 32 * j, &mins[j], -1.f, 0.1f, 20, false)
                             : search_qkx(32, 31, xs, weights, L + 32 * j, &mins[j], -0.5f, 0.1f, 15, false);
    }
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
      const uint8_t a = (uint8_t)nearest_int(inv_scale * scales[j]);
      const uint8_t b = (uint8_t)nearest_int(inv_min * mins[j]);
      ls[j] = a < 63 ? a : 63;
      lm[j] = b < 63 ? b : 63;
    }
    dv = max_scale / 63.f;
    mv = max_min / 63.f;
  } else {
    float sum_x2 = 0;
    for (int l = 0; l < 256; ++l) sum_x2 += x[l] * x[l];
    const float sigma2 = 2 * sum_x2 / 256;
    float sw[8];
    for (int j = 0; j < 8; ++j) {
      const float* xs = x + 32 * j;
      for (int l = 0; l < 32; ++l) weights[l] = qw[32 * j + l] * std::sqrt(sigma2 + xs[l] * xs[l]);
      float sumw = 0;
      for (int l = 0; l < 32; ++l) sumw += weights[l];
      sw[j] = sumw;
      scales[j] = search_qkx(32, nmax, xs, weights, L + 32 * j, &mins[j], -0.9f, 0.05f, 36, false);
    }
    dv = search_qp(8, 63, scales, ls, sw);
    mv = search_qp(8, 63, mins, lm, sw);
    if (nmax == 31) {
      for (int j = 0; j < 8; ++j) {
        ls[j] = ls[j] < 63 ? ls[j] : 63;
        lm[j] = lm[j] < 63 ? lm[j] : 63;
      }
    }
  }
  store_fp16(y, dv);
  store_fp16(y + 2, mv);
  pack_scale_min_k4(ls, lm, y + 4);
  const float df = fp16_round(dv), mf = fp16_round(mv);
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    scale_min_k4(j, y + 4, &sc, &m);
    const float d = df * sc;
    if (!d) continue;
    const float dm = mf * m;
    for (int i = 0; i < 32; ++i) {
      const int l = nearest_int((x[32 * j + i] + dm) / d);
      L[32 * j + i] = (uint8_t)(l < 0 ? 0 : (l > nmax ? nmax : l));
    }
  }
}

inline void encode_q4_k(const float* x, const float* qw, uint8_t* y) {
  uint8_t L[256];
  encode_q45_k(x, qw, 15, y, L);
  uint8_t* q = y + 16;
  for (int j = 0; j < 256; j += 64, q += 32)
    for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
}

inline void encode_q5_k(const float* x, const float* qw, uint8_t* y) {
  uint8_t L[256];
  encode_q45_k(x, qw, 31, y, L);
  uint8_t* qh = y + 16;
  uint8_t* ql = y + 48;
  memset(qh, 0, 32);
  for (int n = 0; n < 4; ++n) {
    for (int j = 0; j < 32; ++j) {
      const int l1 = L[64 * n + j], l2 = L[64 * n + j + 32];
      qh[j] |= (uint8_t)(((l1 >> 4) << (2 * n)) | ((l2 >> 4) << (2 * n + 1)));
      ql[32 * n + j] = (uint8_t)((l1 & 0xF) | ((l2 & 0xF) << 4));
    }
  }
}

inline void encode_q6_k(const float* x, const float* qw, uint8_t* y) {
  int8_t L[256];
  float scales[16];
  float max_scale = 0, max_abs = 0;
  for (int ib = 0; ib < 16; ++ib) {
    scales[ib] = search_qx(16, 32, x + 16 * ib, L + 16 * ib, qw ? qw + 16 * ib : nullptr);
    const float a = std::fabs(scales[ib]);
    if (a > max_abs) {
      max_abs = a;
      max_scale = scales[ib];
    }
  }
  if (max_abs < kGroupMaxEps) {
    memset(y, 0, 210);
    return;
  }
  const float iscale = -128.f / max_scale;
  const float dv = 1 / iscale;
  store_fp16(y + 208, dv);
  int8_t* sc = (int8_t*)(y + 192);
  for (int ib = 0; ib < 16; ++ib) {
    const int v = nearest_int(iscale * scales[ib]);
    sc[ib] = (int8_t)(v < 127 ? v : 127);
  }
  const float df = fp16_round(dv);
  for (int j = 0; j < 16; ++j) {
    const float d = df * sc[j];
    if (!d) continue;
    for (int i = 0; i < 16; ++i) {
      int l = nearest_int(x[16 * j + i] / d);
      l = l < -32 ? -32 : (l > 31 ? 31 : l);
      L[16 * j + i] = (int8_t)(l + 32);
    }
  }
  uint8_t* ql = y;
  uint8_t* qh = y + 128;
  for (int j = 0; j < 256; j += 128, ql += 64, qh += 32) {
    for (int l = 0; l < 32; ++l) {
      const int a = L[j + l], b = L[j + l + 32], c = L[j + l + 64], e = L[j + l + 96];
      ql[l] = (uint8_t)((a & 0xF) | ((c & 0xF) << 4));
      ql[l + 32] = (uint8_t)((b & 0xF) | ((e & 0xF) << 4));
      qh[l] = (uint8_t)((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6));
    }
  }
}

// Q2_K/Q3_K quant layout: per 128 values, byte l holds elems l, l+32, l+64, l+96 in bits 0-1, 2-3, 4-5, 6-7.
inline void pack_2bit_k(const uint8_t* L, uint8_t* qs) {
  for (int j = 0; j < 256; j += 128)
    for (int l = 0; l < 32; ++l)
      qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

inline void encode_q2_k(const float* x, const float* qw, uint8_t* y) {
  uint8_t L[256], sc[16];
  float scales[16], mins[16], weights[16];
  float dv, mv;
  if (!qw) {
    for (int j = 0; j < 16; ++j) {
      for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[16 * j + l]);
      scales[j] = search_qkx(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], -0.5f, 0.1f, 15, true);
    }
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 16; ++j) {
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    for (int j = 0; j < 16; ++j) sc[j] = 0;
    dv = mv = 0.f;
    if (max_scale > 0) {
      const float iscale = 15.f / max_scale;
      for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)nearest_int(iscale * scales[j]);
      dv = max_scale / 15.f;
    }
    if (max_min > 0) {
      const float iscale = 15.f / max_min;
      for (int j = 0; j < 16; ++j) sc[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
      mv = max_min / 15.f;
    }
  } else {
    float sum_x2 = 0;
    for (int j = 0; j < 256; ++j) sum_x2 += x[j] * x[j];
    const float sigma2 = sum_x2 / 256;
    float sw[16];
    uint8_t Ls[16], Lm[16];
    for (int j = 0; j < 16; ++j) {
      for (int l = 0; l < 16; ++l) weights[l] = qw[16 * j + l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
      float s = 0;
      for (int l = 0; l < 16; ++l) s += weights[l];
      sw[j] = s;
      scales[j] = search_qkx(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], -0.9f, 0.05f, 36, false);
    }
    dv = search_qp(16, 15, scales, Ls, sw);
    mv = search_qp(16, 15, mins, Lm, sw);
    for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
  }
  memcpy(y, sc, 16);
  store_fp16(y + 80, dv);
  store_fp16(y + 82, mv);
  const float df = fp16_round(dv), mf = fp16_round(mv);
  for (int j = 0; j < 16; ++j) {
    const float d = df * (sc[j] & 0xF);
    if (!d) continue;
    const float m = mf * (sc[j] >> 4);
    for (int i = 0; i < 16; ++i) {
      const int l = nearest_int((x[16 * j + i] + m) / d);
      L[16 * j + i] = (uint8_t)(l < 0 ? 0 : (l > 3 ? 3 : l));
    }
  }
  pack_2bit_k(L, y + 16);
}

inline void encode_q3_k(const float* x, const float* qw, uint8_t* y) {
  int8_t L[256];
  float scales[16];
  uint8_t* sb = y + 96;  // 12 scale bytes
  memset(sb, 0, 12);
  auto put_scale = [&](int j, int l) {  // l already offset by 32, in [0, 63]
    if (j < 8) sb[j] = (uint8_t)(l & 0xF);
    else sb[j - 8] |= (uint8_t)((l & 0xF) << 4);
    sb[j % 4 + 8] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
  };
  float dv;
  if (!qw) {
    for (int j = 0; j < 16; ++j) scales[j] = search_q3(16, 4, x + 16 * j, L + 16 * j);
    float amax, max_scale;
    abs_max(scales, 16, &amax, &max_scale);
    dv = 0.f;
    if (max_scale) {
      const float iscale = -32.f / max_scale;
      for (int j = 0; j < 16; ++j) {
        int l = nearest_int(iscale * scales[j]);
        l = (l < -32 ? -32 : (l > 31 ? 31 : l)) + 32;
        put_scale(j, l);
      }
      dv = 1 / iscale;
    }
  } else {
    float sum_x2 = 0;
    for (int j = 0; j < 256; ++j) sum_x2 += x[j] * x[j];
    const float sigma2 = 2 * sum_x2 / 256;
    float weights[16], sw[16];
    int8_t Ls[16];
    for (int j = 0; j < 16; ++j) {
      for (int l = 0; l < 16; ++l) weights[l] = qw[16 * j + l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
      float s = 0;
      for (int l = 0; l < 16; ++l) s += weights[l];
      sw[j] = s;
      scales[j] = search_qx(16, 4, x + 16 * j, L + 16 * j, weights);
    }
    dv = search_qx(16, 32, scales, Ls, sw);
    for (int j = 0; j < 16; ++j) put_scale(j, Ls[j]);
  }
  store_fp16(y + 108, dv);
  const float df = fp16_round(dv);
  for (int j = 0; j < 16; ++j) {
    const float d = df * q3_k_scale(j, sb);
    if (!d) continue;
    for (int i = 0; i < 16; ++i) {
      int l = nearest_int(x[16 * j + i] / d);
      l = l < -4 ? -4 : (l > 3 ? 3 : l);
      L[16 * j + i] = (int8_t)(l + 4);
    }
  }
  uint8_t* hm = y;
  memset(hm, 0, 32);
  uint8_t Lu[256];
  for (int j = 0; j < 256; ++j) {
    int v = L[j];
    if (v > 3) {
      hm[j % 32] |= (uint8_t)(1 << (j / 32));
      v -= 4;
    }
    Lu[j] = (uint8_t)v;
  }
  pack_2bit_k(Lu, y + 32);
}

// Encodes one block of type t from x (block_size(t) floats; qw: importance weights or nullptr, used by the K-quant
// searches only); returns false for a type without an encoder (F32 / F16 / BF16 are plain casts in gguf.cpp).
inline bool encode_block(int t, const float* x, const float* qw, uint8_t* y) {
  switch (t) {
    case Q4_0: encode_q4_0(x, y); return true;
    case Q4_1: encode_q4_1(x, y); return true;
    case Q5_0: encode_q5_0(x, y); return true;
    case Q5_1: encode_q5_1(x, y); return true;
    case Q8_0: encode_q8_0(x, y); return true;
    case MXFP4: encode_mxfp4(x, y); return true;
    case Q2_K: encode_q2_k(x, qw, y); return true;
    case Q3_K: encode_q3_k(x, qw, y); return true;
    case Q4_K: encode_q4_k(x, qw, y); return true;
    case Q5_K: encode_q5_k(x, qw, y); return true;
    case Q6_K: encode_q6_k(x, qw, y); return true;
    default: return false;
  }
}

}  // namespace gguf
}  // namespace qkernels
