// lrp_explain: run a model converted by lrp-onnx and print the relevance of each token as JSON.
//
//   lrp_explain MODEL.lrp.onnx --ids 101,2023,2003,102 [--mask 1,1,1,1] [--position P] [--target T]
//               [--provider cuda|cpu]
//   -> {"target": 2, "logit": 3.1, "relevance": [per-token sums], "shape": [1, 4, 384]}
//
// onnxruntime is loaded at run time (dlopen), so the binary works with any onnxruntime >= 1.29
// (API version 29): the one beside it (build/onnxruntime/lib), one on LD_LIBRARY_PATH, or the file
// named by $ONNXRUNTIME_LIB. Errors: one line on stderr, exit code 2.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <numeric>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

struct Args {
  std::string model, provider = "cpu";
  std::vector<int64_t> ids, mask;
  std::vector<int64_t> target, position;  // empty: the model's default (argmax, last position)
};

std::vector<int64_t> parse_ints(const std::string& flag, const std::string& text) {
  std::vector<int64_t> values;
  std::stringstream items(text);
  for (std::string item; std::getline(items, item, ',');) {
    size_t used = 0;
    try {
      values.push_back(std::stoll(item, &used));
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != item.size()) throw std::runtime_error(flag + ": '" + item + "' is not an integer");
  }
  if (values.empty()) throw std::runtime_error(flag + " needs comma-separated integers");
  return values;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag.rfind("--", 0) != 0) {
      if (!a.model.empty()) throw std::runtime_error("unexpected argument '" + flag + "'");
      a.model = flag;
      continue;
    }
    if (i + 1 >= argc) throw std::runtime_error(flag + " needs a value");
    std::string value = argv[++i];
    if (flag == "--ids") a.ids = parse_ints(flag, value);
    else if (flag == "--mask") a.mask = parse_ints(flag, value);
    else if (flag == "--target") a.target = parse_ints(flag, value);
    else if (flag == "--position") a.position = parse_ints(flag, value);
    else if (flag == "--provider" && (value == "cpu" || value == "cuda")) a.provider = value;
    else throw std::runtime_error("unknown option " + flag + " " + value);
  }
  if (a.model.empty() || a.ids.empty())
    throw std::runtime_error("usage: lrp_explain MODEL.lrp.onnx --ids 1,2,3 [--mask 1,1,1] [--position P] "
                             "[--target T] [--provider cuda|cpu]");
  if (a.mask.empty()) a.mask.assign(a.ids.size(), 1);
  if (a.mask.size() != a.ids.size()) throw std::runtime_error("--mask must have as many values as --ids");
  if (a.target.size() > 1 || a.position.size() > 1)
    throw std::runtime_error("--target and --position take one value (one sequence per run)");
  return a;
}

// Load libonnxruntime and hand its API table to the C++ wrapper (ORT_API_MANUAL_INIT).
void load_onnxruntime() {
  const char* path = std::getenv("ONNXRUNTIME_LIB");
  if (path == nullptr) path = "libonnxruntime.so.1";
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) throw std::runtime_error(std::string("cannot load onnxruntime: ") + dlerror());
  using GetApiBase = const OrtApiBase* (*)();
  auto get_api_base = reinterpret_cast<GetApiBase>(dlsym(lib, "OrtGetApiBase"));
  if (get_api_base == nullptr) throw std::runtime_error(std::string(path) + " has no OrtGetApiBase");
  const OrtApi* api = get_api_base()->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    throw std::runtime_error(std::string("onnxruntime ") + get_api_base()->GetVersionString() +
                             " is older than this program's headers (API " + std::to_string(ORT_API_VERSION) + ")");
  Ort::InitApi(api);
}

// The string items of `"key": [...]` in the lrp_onnx metadata JSON (names have no quotes or escapes).
std::vector<std::string> json_strings(const std::string& json, const std::string& key) {
  std::vector<std::string> items;
  size_t at = json.find("\"" + key + "\"");
  size_t end = json.find(']', at);
  if (at == std::string::npos || end == std::string::npos) return items;
  for (size_t open = json.find('"', json.find('[', at)); open < end; open = json.find('"', open + 1)) {
    size_t close = json.find('"', open + 1);
    items.push_back(json.substr(open + 1, close - open - 1));
    open = close;
  }
  return items;
}

Ort::Value int64_tensor(std::vector<int64_t>& data, std::vector<int64_t> shape) {
  auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  return Ort::Value::CreateTensor<int64_t>(memory, data.data(), data.size(), shape.data(), shape.size());
}

int run(const Args& args) {
  load_onnxruntime();
  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "lrp_explain");
  Ort::SessionOptions options;
  if (args.provider == "cuda") {
    auto providers = Ort::GetAvailableProviders();
    if (std::find(providers.begin(), providers.end(), "CUDAExecutionProvider") != providers.end())
      options.AppendExecutionProvider_CUDA_V2(*Ort::CUDAProviderOptions());
    else
      std::fprintf(stderr, "note: this onnxruntime has no CUDA provider; running on CPU\n");
  }
  Ort::Session session(env, args.model.c_str(), options);
  Ort::AllocatorWithDefaultOptions allocator;

  auto meta = session.GetModelMetadata().LookupCustomMetadataMapAllocated("lrp_onnx", allocator);
  if (!meta) throw std::runtime_error(args.model + ": not converted by lrp-onnx (no lrp_onnx metadata)");
  const std::string json = meta.get();
  if (json.find("\"seed_input\": true") != std::string::npos)
    throw std::runtime_error(args.model + ": converted with --seed-input; this example feeds targets, not seeds");
  const std::string relevance_name = json_strings(json, "relevance_outputs").at(0);

  // What the model can be fed: its inputs, and (models from before opset 15) initializer-backed defaults.
  std::set<std::string> feedable;
  for (size_t i = 0; i < session.GetOverridableInitializerCount(); ++i)
    feedable.insert(session.GetOverridableInitializerNameAllocated(i, allocator).get());

  const int64_t n = static_cast<int64_t>(args.ids.size());
  std::vector<int64_t> ids = args.ids, mask = args.mask, zeros(n, 0), positions(n), target = args.target,
                       position = args.position;
  for (int64_t i = 0, p = -1; i < n; ++i) positions[i] = (p += mask[i] != 0);  // cumsum(mask) - 1
  std::vector<std::string> names;
  std::vector<Ort::Value> values;
  std::map<std::string, size_t> rank;  // the plain lrp_target / lrp_position inputs and their rank
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    std::string name = session.GetInputNameAllocated(i, allocator).get();
    feedable.insert(name);
    if (name == "input_ids") values.push_back(int64_tensor(ids, {1, n}));
    else if (name == "attention_mask") values.push_back(int64_tensor(mask, {1, n}));
    else if (name == "token_type_ids") values.push_back(int64_tensor(zeros, {1, n}));
    else if (name == "position_ids") values.push_back(int64_tensor(positions, {1, n}));
    else if (name == "lrp_target" || name == "lrp_position") {
      // plain int64 inputs (the default form): fed below, -1 (argmax, last position) unless given. An
      // optional(tensor(int64)) input (convert --inputs optional) takes the same tensor.
      auto info = session.GetInputTypeInfo(i);
      if (info.GetONNXType() == ONNX_TYPE_TENSOR) rank[name] = info.GetTensorTypeAndShapeInfo().GetDimensionsCount();
      continue;
    } else throw std::runtime_error(args.model + ": cannot feed input '" + name + "' from --ids/--mask");
    names.push_back(name);
  }
  if (!position.empty() && !feedable.count("lrp_position"))
    throw std::runtime_error("--position: the model has no input lrp_position (no sequence axis)");
  for (auto [name, given] : {std::pair{"lrp_target", &target}, std::pair{"lrp_position", &position}}) {
    // fed when the model has the input: always for the plain form (required), else only when chosen
    // (an optional input, or an initializer-backed default of a model below opset 15, may be omitted)
    if (!feedable.count(name) || (given->empty() && !rank.count(name))) continue;
    if (given->empty()) given->push_back(-1);
    names.push_back(name);
    values.push_back(int64_tensor(*given, std::vector<int64_t>(rank.count(name) ? rank[name] : 1, 1)));
  }

  std::vector<std::string> output_names;
  for (size_t i = 0; i < session.GetOutputCount(); ++i)
    output_names.push_back(session.GetOutputNameAllocated(i, allocator).get());
  std::vector<const char*> in_ptrs, out_ptrs;
  for (auto& s : names) in_ptrs.push_back(s.c_str());
  for (auto& s : output_names) out_ptrs.push_back(s.c_str());
  Ort::RunOptions run_options;
  run_options.SetRunLogSeverityLevel(ORT_LOGGING_LEVEL_FATAL);  // a failing run is reported once, below
  auto outputs = session.Run(run_options, in_ptrs.data(), values.data(), values.size(),
                             out_ptrs.data(), out_ptrs.size());
  auto output = [&](const std::string& name) -> Ort::Value* {
    for (size_t i = 0; i < output_names.size(); ++i)
      if (output_names[i] == name) return &outputs[i];
    return nullptr;
  };

  // relevance [1, sequence, hidden] (or the source's shape): sum over the last axis per token
  Ort::Value* relevance = output(relevance_name);
  if (relevance->GetTensorTypeAndShapeInfo().GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    throw std::runtime_error(relevance_name + " is not float32");
  auto shape = relevance->GetTensorTypeAndShapeInfo().GetShape();
  const float* r = relevance->GetTensorData<float>();
  const size_t total = relevance->GetTensorTypeAndShapeInfo().GetElementCount();
  const size_t inner = shape.size() >= 3 ? static_cast<size_t>(shape.back()) : 1;
  std::string out = "{\"target\": ";
  Ort::Value* t = output("lrp_selected_target");
  out += t ? std::to_string(t->GetTensorData<int64_t>()[0]) : "null";
  char number[32];
  Ort::Value* logit = output("lrp_selected_logit");
  if (logit) std::snprintf(number, sizeof number, "%.9g", logit->GetTensorData<float>()[0]);
  out += std::string(", \"logit\": ") + (logit ? number : "null") + ", \"relevance\": [";
  for (size_t i = 0; i < total / inner; ++i) {
    double sum = std::accumulate(r + i * inner, r + (i + 1) * inner, 0.0);
    std::snprintf(number, sizeof number, "%s%.9g", i ? ", " : "", sum);
    out += number;
  }
  out += "], \"shape\": [";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  std::printf("%s]}\n", out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const std::exception& e) {  // Ort::Exception included
    std::string message = e.what();
    std::replace(message.begin(), message.end(), '\n', ' ');
    std::fprintf(stderr, "lrp_explain: %s\n", message.c_str());
    return 2;
  }
}
