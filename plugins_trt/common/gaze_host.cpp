// Host-side rules of the gaze::GazeAttention node: see gaze_host.h.
#include "gaze_host.h"

#include <cmath>
#include <cstring>
#include <sstream>

namespace gaze {
namespace {

[[noreturn]] void invalid(const std::string& msg) { throw Error(Error::kInvalid, msg); }
[[noreturn]] void unsupported(const std::string& msg) { throw Error(Error::kUnsupported, msg); }

const char* field_type_name(FieldType t) {
  switch (t) {
    case FieldType::kF16: return "FLOAT16";
    case FieldType::kF32: return "FLOAT32";
    case FieldType::kF64: return "FLOAT64";
    case FieldType::kI8: return "INT8";
    case FieldType::kI16: return "INT16";
    case FieldType::kI32: return "INT32";
    case FieldType::kChar: return "CHAR (string)";
    case FieldType::kDims: return "DIMS";
    case FieldType::kBF16: return "BF16";
    case FieldType::kI64: return "INT64";
    default: return "UNKNOWN";
  }
}

std::string dims_str(const TensorDesc& t) {
  std::ostringstream s;
  s << dtype_name(t.dtype) << "[";
  for (int i = 0; i < t.nb_dims; ++i) s << (i ? ", " : "") << t.dims[i];
  s << "]";
  return s.str();
}

const char* kInputNames[kNumInputs] = {"query", "key", "value", "past_key", "past_value", "past_desc",
                                       "slot_pos", "slot_region", "slot_valid", "gaze", "write_offset"};

int32_t get_int(const Field& f) {
  if (f.type != FieldType::kI32 || f.length != 1 || f.data == nullptr)
    invalid(std::string("attribute '") + f.name + "' must be one INT (INT32 field of length 1), got " +
            field_type_name(f.type) + " of length " + std::to_string(f.length));
  int32_t v;
  std::memcpy(&v, f.data, sizeof v);
  return v;
}

float get_float(const Field& f) {
  if (f.type != FieldType::kF32 || f.length != 1 || f.data == nullptr)
    invalid(std::string("attribute '") + f.name + "' must be one FLOAT (FLOAT32 field of length 1), got " +
            field_type_name(f.type) + " of length " + std::to_string(f.length));
  float v;
  std::memcpy(&v, f.data, sizeof v);
  return v;
}

std::string get_string(const Field& f) {
  if (f.type != FieldType::kChar || f.length < 0 || (f.length > 0 && f.data == nullptr))
    invalid(std::string("attribute '") + f.name + "' must be a STRING (CHAR field), got " + field_type_name(f.type));
  const char* c = static_cast<const char*>(f.data);
  size_t n = static_cast<size_t>(f.length);
  while (n > 0 && c[n - 1] == '\0') --n;  // the parser may count the terminator
  return std::string(c, n);
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
    case DType::kI32: return "int32";
    case DType::kI64: return "int64";
    case DType::kBool: return "bool";
  }
  return "unknown";
}

const std::vector<std::string>& attribute_names() {
  static const std::vector<std::string> names = {"top_k", "max_region_tokens", "scale", "routing",
                                                 "context_attention", "plugin_namespace", "plugin_version"};
  return names;
}

void validate_attributes(const Attributes& a) {
  if (a.top_k < 1) invalid("attribute 'top_k' must be >= 1, got " + std::to_string(a.top_k));
  if (a.max_region_tokens < 1)
    invalid("attribute 'max_region_tokens' must be >= 1, got " + std::to_string(a.max_region_tokens));
  if (a.max_region_tokens > kMaxRegionTokens)
    unsupported("attribute 'max_region_tokens' = " + std::to_string(a.max_region_tokens) +
                " exceeds the supported maximum " + std::to_string(kMaxRegionTokens));
  if (!(std::isfinite(a.scale) && a.scale > 0.f))
    invalid("attribute 'scale' must be a finite float > 0, got " + std::to_string(a.scale));
  if (a.routing != kRoutingKvHead && a.routing != kRoutingQueryHead)
    invalid("attribute 'routing' must be 0 (kv_head) or 1 (query_head), got " + std::to_string(a.routing));
  if (a.context_attention != kContextCausal && a.context_attention != kContextOwnImage)
    invalid("attribute 'context_attention' must be 0 (causal) or 1 (own_image), got " +
            std::to_string(a.context_attention));
}

Attributes parse_attributes(const Field* fields, int num_fields) {
  if (num_fields < 0 || (num_fields > 0 && fields == nullptr)) invalid("attribute list is null");
  Attributes a;
  bool have_top_k = false, have_mrt = false, have_scale = false;
  for (int i = 0; i < num_fields; ++i) {
    const Field& f = fields[i];
    if (f.name == nullptr) invalid("attribute " + std::to_string(i) + " has no name");
    const std::string name = f.name;
    if (name == "top_k") {
      a.top_k = get_int(f);
      have_top_k = true;
    } else if (name == "max_region_tokens") {
      a.max_region_tokens = get_int(f);
      have_mrt = true;
    } else if (name == "scale") {
      a.scale = get_float(f);
      have_scale = true;
    } else if (name == "routing") {  // node v2; absent (v1): 0
      a.routing = get_int(f);
    } else if (name == "context_attention") {  // node v2; absent (v1): 0
      a.context_attention = get_int(f);
    } else if (name == "plugin_namespace") {
      if (get_string(f) != kPluginNamespace)
        invalid("attribute 'plugin_namespace' is '" + get_string(f) + "', this plugin is '" + kPluginNamespace + "'");
    } else if (name == "plugin_version") {
      if (get_string(f) != kPluginVersion)
        invalid("attribute 'plugin_version' is '" + get_string(f) + "', this plugin is version " + kPluginVersion);
    }
    // Other names are ignored: TensorRT passes only the names we advertise.
  }
  std::string missing;
  if (!have_top_k) missing += " top_k";
  if (!have_mrt) missing += " max_region_tokens";
  if (!have_scale) missing += " scale";
  if (!missing.empty())
    invalid("GazeAttention node is missing required attribute(s):" + missing +
            " (re-export with `gaze export`; every attribute is set explicitly on the node)");
  validate_attributes(a);
  return a;
}

const std::vector<DispatchEntry>& dispatch_table() {
  static const std::vector<DispatchEntry> table = {
      {DType::kF16, 64, "gaze<half, D=64, vec=8>"},       {DType::kF16, 128, "gaze<half, D=128, vec=8>"},
      {DType::kBF16, 64, "gaze<bfloat16, D=64, vec=8>"},  {DType::kBF16, 128, "gaze<bfloat16, D=128, vec=8>"},
      {DType::kF32, 64, "gaze<float, D=64, vec=4>"},      {DType::kF32, 128, "gaze<float, D=128, vec=4>"},
  };
  return table;
}

bool dispatch_supported(DType dtype, int64_t head_dim) {
  for (const auto& e : dispatch_table())
    if (e.dtype == dtype && e.head_dim == head_dim) return true;
  return false;
}

bool supports_io_dtype(int pos, DType dtype, DType query_dtype) {
  const bool float_ok = dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16;
  switch (pos) {
    case kQuery: return float_ok;
    case kKey: case kValue: case kPastKey: case kPastValue: return dtype == query_dtype;
    case kPastDesc: return dtype == DType::kF32;
    case kSlotPos: case kSlotRegion: case kWriteOffset: return dtype == DType::kI64;
    case kSlotValid: case kGaze: return dtype == DType::kBool;
    case kNumInputs + 0: case kNumInputs + 1: case kNumInputs + 2: return dtype == query_dtype;
    case kNumInputs + 3: return dtype == DType::kF32;
    default: return false;
  }
}

bool supports_io_dtype_v2(int pos, DType dtype, DType query_dtype) {
  const bool float_ok = dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16;
  switch (pos) {
    case v2::kQuery: return float_ok;
    case v2::kKey: case v2::kValue: case v2::kPastKey: case v2::kPastValue: return dtype == query_dtype;
    case v2::kPastDesc: return dtype == DType::kF32;
    case v2::kSlotValid: case v2::kGaze: return dtype == DType::kBool;
    case v2::kWriteOffset: case v2::kSlotPos: case v2::kSlotRegion: case v2::kSlotImage: case v2::kDenseSlots:
    case v2::kRegionSlots: case v2::kRegionCount: case v2::kRegionLast: return dtype == DType::kI64;
    case v2::kNumInputs + 0: case v2::kNumInputs + 1: case v2::kNumInputs + 2: return dtype == query_dtype;
    case v2::kNumInputs + 3: return dtype == DType::kF32;
    default: return false;
  }
}

namespace {

// Unifies dimension values that must be equal; -1 (unknown) agrees with anything.
struct DimVar {
  explicit DimVar(const char* n) : name(n) {}
  const char* name;
  int64_t value = -1;
  std::string where;
  void bind(int64_t v, const std::string& at) {
    if (v < 0) return;
    if (value >= 0 && v != value)
      invalid(std::string("dimension ") + name + " is " + std::to_string(value) + " in " + where + " but " +
              std::to_string(v) + " in " + at);
    if (value < 0) {
      value = v;
      where = at;
    }
  }
};

}  // namespace

std::vector<TensorDesc> infer_outputs(const TensorDesc* in, int num_inputs, const Attributes& attrs) {
  if (num_inputs != kNumInputs || in == nullptr)
    invalid("GazeAttention takes " + std::to_string(kNumInputs) + " inputs, got " + std::to_string(num_inputs));
  static const int kRank[kNumInputs] = {4, 4, 4, 4, 4, 4, 2, 2, 2, 2, 1};
  for (int i = 0; i < kNumInputs; ++i) {
    if (in[i].nb_dims != kRank[i])
      invalid(std::string("input ") + std::to_string(i) + " '" + kInputNames[i] + "' must have rank " +
              std::to_string(kRank[i]) + ", got " + dims_str(in[i]));
  }
  const DType t = in[kQuery].dtype;
  if (!supports_io_dtype(kQuery, t, t))
    unsupported(std::string("query dtype ") + dtype_name(t) + " is not supported (float32, float16, bfloat16)");
  for (int i = 1; i < kNumInputs; ++i) {
    if (!supports_io_dtype(i, in[i].dtype, t))
      invalid(std::string("input ") + std::to_string(i) + " '" + kInputNames[i] + "' has dtype " +
              dtype_name(in[i].dtype) + ", expected " +
              (i <= kPastValue ? dtype_name(t) : i == kPastDesc ? "float32" :
               (i == kSlotValid || i == kGaze) ? "bool" : "int64"));
  }
  DimVar B{"B"}, T{"T"}, S{"S"}, R{"R"}, Hq{"Hq"}, Hkv{"Hkv"}, D{"D"}, one{"write_offset size"};
  auto at = [](int i, int d) { return std::string(kInputNames[i]) + ".shape[" + std::to_string(d) + "]"; };
  B.bind(in[kQuery].dims[0], at(kQuery, 0));
  Hq.bind(in[kQuery].dims[1], at(kQuery, 1));
  T.bind(in[kQuery].dims[2], at(kQuery, 2));
  D.bind(in[kQuery].dims[3], at(kQuery, 3));
  for (int i : {kKey, kValue}) {
    B.bind(in[i].dims[0], at(i, 0)); Hkv.bind(in[i].dims[1], at(i, 1));
    T.bind(in[i].dims[2], at(i, 2)); D.bind(in[i].dims[3], at(i, 3));
  }
  for (int i : {kPastKey, kPastValue}) {
    B.bind(in[i].dims[0], at(i, 0)); Hkv.bind(in[i].dims[1], at(i, 1));
    S.bind(in[i].dims[2], at(i, 2)); D.bind(in[i].dims[3], at(i, 3));
  }
  B.bind(in[kPastDesc].dims[0], at(kPastDesc, 0)); Hkv.bind(in[kPastDesc].dims[1], at(kPastDesc, 1));
  R.bind(in[kPastDesc].dims[2], at(kPastDesc, 2)); D.bind(in[kPastDesc].dims[3], at(kPastDesc, 3));
  for (int i : {kSlotPos, kSlotRegion, kSlotValid}) { B.bind(in[i].dims[0], at(i, 0)); S.bind(in[i].dims[1], at(i, 1)); }
  B.bind(in[kGaze].dims[0], at(kGaze, 0)); T.bind(in[kGaze].dims[1], at(kGaze, 1));
  one.bind(1, "the contract");
  one.bind(in[kWriteOffset].dims[0], at(kWriteOffset, 0));

  if (Hq.value >= 0 && Hkv.value > 0) {
    if (Hq.value % Hkv.value)
      invalid("query heads " + std::to_string(Hq.value) + " are not a multiple of KV heads " +
              std::to_string(Hkv.value));
    if (Hq.value / Hkv.value > kMaxGroup)
      unsupported("GQA group " + std::to_string(Hq.value / Hkv.value) + " (Hq/Hkv) exceeds the supported " +
                  std::to_string(kMaxGroup));
  }
  if (Hkv.value == 0 || Hq.value == 0) invalid("head counts must be >= 1");
  if (D.value >= 0 && !dispatch_supported(t, D.value))
    unsupported(std::string("no GazeAttention kernel for ") + dtype_name(t) + " with head dim " +
                std::to_string(D.value) + " (supported head dims: 64, 128)");
  if (R.value == 0) invalid("region capacity R (past_desc.shape[2]) must be >= 1");
  if (R.value > kMaxRegions)
    unsupported("region capacity R = " + std::to_string(R.value) + " exceeds the supported " +
                std::to_string(kMaxRegions));
  validate_attributes(attrs);

  std::vector<TensorDesc> out(kNumOutputs);
  for (int i = 0; i < kNumOutputs; ++i) out[i] = in[kOutputSource[i]];
  return out;
}

std::vector<TensorDesc> infer_outputs_v2(const TensorDesc* in, int num_inputs, const Attributes& attrs) {
  static const char* const kNames[v2::kNumInputs] = {
      "query", "key", "value", "past_key", "past_value", "past_desc", "write_offset", "slot_pos", "slot_valid",
      "slot_region", "slot_image", "gaze", "dense_slots", "region_slots", "region_count", "region_last"};
  validate_attributes(attrs);
  if (num_inputs != v2::kNumInputs || in == nullptr)
    invalid("GazeAttention v2 takes " + std::to_string(v2::kNumInputs) + " inputs, got " + std::to_string(num_inputs));
  static const int kRank[v2::kNumInputs] = {4, 4, 4, 4, 4, 4, 1, 2, 2, 2, 2, 2, 2, 3, 2, 2};
  for (int i = 0; i < v2::kNumInputs; ++i) {
    if (in[i].nb_dims != kRank[i])
      invalid(std::string("input ") + std::to_string(i) + " '" + kNames[i] + "' must have rank " +
              std::to_string(kRank[i]) + ", got " + dims_str(in[i]));
  }
  const DType t = in[v2::kQuery].dtype;
  if (!supports_io_dtype(gaze::kQuery, t, t))
    unsupported(std::string("query dtype ") + dtype_name(t) + " is not supported (float32, float16, bfloat16)");
  for (int i = 1; i < v2::kNumInputs; ++i) {
    const DType want = i <= v2::kPastValue ? t : i == v2::kPastDesc ? DType::kF32
                       : (i == v2::kSlotValid || i == v2::kGaze) ? DType::kBool : DType::kI64;
    if (in[i].dtype != want)
      invalid(std::string("input ") + std::to_string(i) + " '" + kNames[i] + "' has dtype " +
              dtype_name(in[i].dtype) + ", expected " + dtype_name(want));
  }
  DimVar B{"B"}, T{"T"}, S{"S"}, R{"R"}, Hq{"Hq"}, Hkv{"Hkv"}, D{"D"}, N{"N"}, M{"M"}, one{"write_offset size"};
  auto at = [](int i, int d) { return std::string(kNames[i]) + ".shape[" + std::to_string(d) + "]"; };
  B.bind(in[v2::kQuery].dims[0], at(v2::kQuery, 0));
  Hq.bind(in[v2::kQuery].dims[1], at(v2::kQuery, 1));
  T.bind(in[v2::kQuery].dims[2], at(v2::kQuery, 2));
  D.bind(in[v2::kQuery].dims[3], at(v2::kQuery, 3));
  for (int i : {v2::kKey, v2::kValue}) {
    B.bind(in[i].dims[0], at(i, 0)); Hkv.bind(in[i].dims[1], at(i, 1));
    T.bind(in[i].dims[2], at(i, 2)); D.bind(in[i].dims[3], at(i, 3));
  }
  for (int i : {v2::kPastKey, v2::kPastValue}) {
    B.bind(in[i].dims[0], at(i, 0)); Hkv.bind(in[i].dims[1], at(i, 1));
    S.bind(in[i].dims[2], at(i, 2)); D.bind(in[i].dims[3], at(i, 3));
  }
  B.bind(in[v2::kPastDesc].dims[0], at(v2::kPastDesc, 0)); Hkv.bind(in[v2::kPastDesc].dims[1], at(v2::kPastDesc, 1));
  R.bind(in[v2::kPastDesc].dims[2], at(v2::kPastDesc, 2)); D.bind(in[v2::kPastDesc].dims[3], at(v2::kPastDesc, 3));
  for (int i : {v2::kSlotPos, v2::kSlotValid, v2::kSlotRegion, v2::kSlotImage}) {
    B.bind(in[i].dims[0], at(i, 0)); S.bind(in[i].dims[1], at(i, 1));
  }
  B.bind(in[v2::kGaze].dims[0], at(v2::kGaze, 0)); T.bind(in[v2::kGaze].dims[1], at(v2::kGaze, 1));
  B.bind(in[v2::kDenseSlots].dims[0], at(v2::kDenseSlots, 0)); N.bind(in[v2::kDenseSlots].dims[1], at(v2::kDenseSlots, 1));
  M.bind(attrs.max_region_tokens, "attribute max_region_tokens");
  B.bind(in[v2::kRegionSlots].dims[0], at(v2::kRegionSlots, 0)); R.bind(in[v2::kRegionSlots].dims[1], at(v2::kRegionSlots, 1));
  M.bind(in[v2::kRegionSlots].dims[2], at(v2::kRegionSlots, 2));
  for (int i : {v2::kRegionCount, v2::kRegionLast}) { B.bind(in[i].dims[0], at(i, 0)); R.bind(in[i].dims[1], at(i, 1)); }
  one.bind(1, "the contract");
  one.bind(in[v2::kWriteOffset].dims[0], at(v2::kWriteOffset, 0));
  if (N.value == 0) invalid("dense_slots must have N >= 1 columns");

  // The rest (heads, head dim, R, attributes) are v1's rules: check them on the v1 view.
  TensorDesc v1[gaze::kNumInputs];
  const int from[gaze::kNumInputs] = {v2::kQuery, v2::kKey, v2::kValue, v2::kPastKey, v2::kPastValue, v2::kPastDesc,
                                      v2::kSlotPos, v2::kSlotRegion, v2::kSlotValid, v2::kGaze, v2::kWriteOffset};
  for (int i = 0; i < gaze::kNumInputs; ++i) v1[i] = in[from[i]];
  return infer_outputs(v1, gaze::kNumInputs, attrs);
}

Problem problem_from_inputs(const TensorDesc* in, int num_inputs, const Attributes& attrs) {
  infer_outputs(in, num_inputs, attrs);
  Problem p;
  p.batch = in[kQuery].dims[0];
  p.q_heads = in[kQuery].dims[1];
  p.new_tokens = in[kQuery].dims[2];
  p.head_dim = in[kQuery].dims[3];
  p.kv_heads = in[kPastKey].dims[1];
  p.cache_len = in[kPastKey].dims[2];
  p.num_regions = in[kPastDesc].dims[2];
  p.dtype = in[kQuery].dtype;
  p.top_k = attrs.top_k;
  p.max_region_tokens = attrs.max_region_tokens;
  check_problem(p);
  return p;
}

void check_problem(const Problem& p) {
  const int64_t dims[] = {p.batch, p.new_tokens, p.cache_len, p.num_regions, p.q_heads, p.kv_heads, p.head_dim};
  const char* names[] = {"batch", "new_tokens", "cache_len", "num_regions", "q_heads", "kv_heads", "head_dim"};
  for (int i = 0; i < 7; ++i)
    if (dims[i] < 1) invalid(std::string(names[i]) + " must be >= 1 (known), got " + std::to_string(dims[i]));
  if (p.q_heads % p.kv_heads) invalid("q_heads must be a multiple of kv_heads");
  if (p.group() > kMaxGroup) unsupported("GQA group " + std::to_string(p.group()) + " exceeds " +
                                         std::to_string(kMaxGroup));
  if (!dispatch_supported(p.dtype, p.head_dim))
    unsupported(std::string("no GazeAttention kernel for ") + dtype_name(p.dtype) + " with head dim " +
                std::to_string(p.head_dim) + " (supported head dims: 64, 128)");
  if (p.num_regions > kMaxRegions)
    unsupported("num_regions " + std::to_string(p.num_regions) + " exceeds " + std::to_string(kMaxRegions));
  if (p.cache_len > (int64_t(1) << 30)) unsupported("cache_len over 2^30 slots");
  Attributes a;
  a.top_k = p.top_k;
  a.max_region_tokens = p.max_region_tokens;
  a.scale = 1.f;
  validate_attributes(a);
}

int plan_splits(const Problem& p, int num_sms) {
  if (p.new_tokens > kDecodeMaxT) return 1;
  const int64_t work = p.batch * p.kv_heads * p.new_tokens;
  const int64_t target = 2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  int64_t splits = (target + work - 1) / work;
  const int64_t by_keys = p.cache_len / kMinKeysPerSplit;
  if (splits > by_keys) splits = by_keys;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

int plan_select_parts(const Problem& p, int64_t rows) {
  int64_t parts = (p.num_regions + kSelectPartRegions - 1) / kSelectPartRegions;
  if (parts > kMaxSelectParts) parts = kMaxSelectParts;
  const int64_t by_blocks = kSelectPartBlocks / (rows > 1 ? rows : 1);
  if (parts > by_blocks) parts = by_blocks;
  return parts < 1 ? 1 : static_cast<int>(parts);
}

WorkspaceLayout workspace_layout(const Problem& p) {
  check_problem(p);
  WorkspaceLayout w{};
  WorkspaceCursor cursor;
  auto take = [&cursor](size_t bytes) { return cursor.take(bytes); };
  const size_t B = p.batch, S = p.cache_len, R = p.num_regions, mrt = p.max_region_tokens;
  w.query_chunk = p.new_tokens < kQueryChunk ? p.new_tokens : kQueryChunk;
  // Sized for min(T, kDecodeMaxT) even when T > kDecodeMaxT (unused then): a profile whose
  // largest T is a prefill chunk also serves calls with T <= kDecodeMaxT, which need them.
  w.partial_queries = p.new_tokens < kDecodeMaxT ? p.new_tokens : kDecodeMaxT;
  w.error_flags = take(sizeof(int32_t));
  w.region_count = take(B * R * sizeof(int32_t));
  w.region_last = take(B * R * sizeof(int64_t));
  w.region_slots = take(B * R * mrt * sizeof(int32_t));
  w.valid_slots = take(B * S * sizeof(int32_t));
  w.dense_slots = take(B * S * sizeof(int32_t));
  w.n_valid = take(B * sizeof(int32_t));
  w.n_dense = take(B * sizeof(int32_t));
  // Selections per query head: room for routing = query_head (kv_head uses the first Hkv rows).
  const size_t bhq = B * p.q_heads * w.query_chunk;
  w.sel = take(bhq * p.kmax() * sizeof(int32_t));
  w.n_sel = take(bhq * sizeof(int32_t));
  // Split-KV partials (used only when T <= kDecodeMaxT), sized for the largest split count.
  const size_t partial_rows = B * w.partial_queries * p.q_heads * kMaxSplits;
  w.part_acc = take(partial_rows * p.head_dim * sizeof(float));
  w.part_ml = take(partial_rows * 2 * sizeof(float));
  w.total = cursor.size();
  return w;
}

size_t workspace_size(const Problem& p) {
  // Every array grows with B, T (through min(T, kDecodeMaxT) and min(T, kQueryChunk)), S, R,
  // heads, D, top_k and max_region_tokens, so the size at a profile's largest shape covers all.
  return workspace_layout(p).total;
}

std::string describe_device_errors(int32_t flags) {
  std::string s;
  if (flags & kErrWriteOffset) s += "write_offset + T exceeds the cache length S (or is negative); ";
  if (flags & kErrRegionId) s += "a valid slot has slot_region >= R (past_desc.shape[2]); ";
  if (flags & kErrRegionOverfull) s += "a region holds more valid slots than max_region_tokens; ";
  if (s.empty()) s = "no error";
  return s;
}

}  // namespace gaze
