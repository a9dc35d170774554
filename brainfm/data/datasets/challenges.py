"""Lesion datasets with voxel labels: BraTS 2021 (tumour), ATLAS v2.0 (stroke), MSLUB (MS), WMH 2017 (small
vessel disease). Every listed row carries its lesion label; a subject whose release ships no label is not
listed (a label-less row reads as a healthy scan in ``brainfm evaluate``) and is reported as ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

from brainfm.data.datasets.common import NIFTI, DatasetRow, DatasetScan, Layout

NO_LABEL = "{} missing (a release without labels: a label-less row would count as a healthy scan)"

# ------------------------------------------------------------------------------------------------ BraTS 2021
# Layout: Baid et al. 2021, "The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on Brain Tumor Segmentation and
# Radiogenomic Classification", arXiv:2107.02314, and the challenge's Synapse page (syn25829067): one folder
# per case, BraTS2021_<5 digits>/BraTS2021_<5 digits>_{t1,t1ce,t2,flair,seg}.nii.gz, co-registered to the
# SRI24 atlas at 1 mm and skull-stripped. seg labels 1 necrotic core, 2 oedema, 4 enhancing tumour; brainfm
# evaluate reads label > 0 (whole tumour), the convention of the UAD papers. t1ce (post-contrast T1) is its
# own modality, T1CE. The validation and test releases have no seg: those cases are ignored.
_BRATS_FILE = re.compile(r"^(BraTS2021_\d{5})_(t1|t1ce|t2|flair|seg)" + NIFTI + "$")
_BRATS_MODALITIES = {"t1": "T1", "t1ce": "T1CE", "t2": "T2", "flair": "FLAIR"}


def scan_brats2021(root: Path, files: list[Path]) -> DatasetScan:
    scan = DatasetScan("brats2021", root)
    cases: dict[Path, dict[str, Path]] = {}
    for path in files:
        match = _BRATS_FILE.match(path.name)
        if match is not None and path.parent.name == match.group(1):
            cases.setdefault(path.parent, {})[match.group(2)] = path
    incomplete = 0
    for folder, found in sorted(cases.items()):
        seg = found.get("seg")
        if seg is None:
            scan.ignore(found.values(), NO_LABEL.format("BraTS seg"))
            continue
        incomplete += any(kind not in found for kind in _BRATS_MODALITIES)
        for kind, modality in _BRATS_MODALITIES.items():
            if kind in found:
                scan.add(
                    DatasetRow(
                        path=found[kind],
                        subject=folder.name,
                        dataset="brats2021",
                        modality=modality,
                        label=seg,
                        lesion_type="tumour",
                    )
                )
    if incomplete:
        scan.notes.append(f"{incomplete} BraTS case(s) lack one of t1, t1ce, t2, flair")
    return scan


BRATS2021 = Layout(
    name="brats2021",
    title="BraTS 2021",
    expected="BraTS2021_<nnnnn>/BraTS2021_<nnnnn>_{t1,t1ce,t2,flair,seg}.nii.gz case folders",
    source="Baid et al. 2021, arXiv:2107.02314; https://www.synapse.org/brats2021",
    scan=scan_brats2021,
)

# ----------------------------------------------------------------------------------------------- ATLAS v2.0
# Layout: Liew et al. 2022, "A large, curated, open-source stroke neuroimaging dataset to improve lesion
# segmentation algorithms", Sci Data 9:320, and https://fcon_1000.projects.nitrc.org/indi/retro/atlas.html:
# ATLAS_2/{Training,Testing}/R<cohort>/sub-r<cohort>s<nnn>/ses-<n>/anat/
# sub-..._ses-<n>_space-MNI152NLin2009aSym_T1w.nii.gz with ..._label-L_desc-T1lesion_mask.nii.gz (Training
# only; the Testing masks are withheld, so Testing scans are ignored). The R<cohort> folder is the acquiring
# site.
_ATLAS_FILE = re.compile(
    r"^(sub-r(\d{3})s\d{3})_ses-(\w+?)_(?:space-[A-Za-z0-9]+_)?(T1w|label-L_desc-T1lesion_mask)" + NIFTI + "$"
)


def scan_atlas2(root: Path, files: list[Path]) -> DatasetScan:
    scan = DatasetScan("atlas2", root, extra_columns=("partition",))
    groups: dict[Path, dict[str, Path]] = {}
    for path in files:
        match = _ATLAS_FILE.match(path.name)
        if match is None:
            continue
        subject, cohort, session, kind = match.groups()
        anat = path.parent
        chain = (anat.name, anat.parent.name, anat.parent.parent.name, anat.parent.parent.parent.name.upper())
        if chain != ("anat", f"ses-{session}", subject, f"R{cohort}"):
            continue
        groups.setdefault(anat, {})[kind] = path
    for anat, found in sorted(groups.items()):
        t1, mask = found.get("T1w"), found.get("label-L_desc-T1lesion_mask")
        if t1 is None:
            continue  # a mask without its scan stays unclassified
        if mask is None:
            scan.ignore([t1], NO_LABEL.format("ATLAS lesion mask"))
            continue
        cohort_dir = anat.parent.parent.parent
        partition = cohort_dir.parent.name if cohort_dir.parent.name in ("Training", "Testing") else ""
        scan.add(
            DatasetRow(
                path=t1,
                subject=anat.parent.parent.name,
                dataset="atlas2",
                modality="T1",
                site=cohort_dir.name,
                label=mask,
                lesion_type="stroke",
                extra=(("partition", partition),),
            )
        )
    return scan


ATLAS2 = Layout(
    name="atlas2",
    title="ATLAS v2.0",
    expected="ATLAS_2/Training/R<nnn>/sub-r<nnn>s<nnn>/ses-<n>/anat/*_T1w.nii.gz with "
    "*_label-L_desc-T1lesion_mask.nii.gz",
    source="Liew et al. 2022, Sci Data 9:320; https://fcon_1000.projects.nitrc.org/indi/retro/atlas.html",
    scan=scan_atlas2,
)

# ------------------------------------------------------------------------------------------------------ MSLUB
# Layout: Lesjak et al. 2018, "A Novel Public MR Image Dataset of Multiple Sclerosis Patients With Lesion
# Segmentations Based on Multi-rater Consensus", Neuroinformatics 16:51-63, distributed at
# https://lit.fe.uni-lj.si/en/research/resources/3D-MR-MS/ (30 patients, 3 T Siemens at UMC Ljubljana). Two
# documented variants are accepted:
#  - the archive (its README): patientXX/patientXX_{T1W,T1WKS,T2W,FLAIR}.nii.gz co-registered to FLAIR and
#    bias corrected, patientXX_brainmask.nii.gz, patientXX_consensus_gt.nii.gz (in FLAIR space),
#    patientXX_<modality>_to_FLAIR.txt transforms, raw/patientXX_<modality>.nii.gz in their original spaces;
#  - the open_ms_data mirror (github.com/muschellij2/open_ms_data, README):
#    cross_sectional/{raw,coregistered}/patientXX/{FLAIR,T1W,T1WKS,T2W,consensus_gt,brainmask}.nii.gz,
#    cross_sectional/MNI/, longitudinal/ (a different, lesion-change dataset; spelled "longitiudinal" there).
# Only the co-registered images are listed: the consensus label lives on their FLAIR grid. T1WKS is the
# contrast-enhanced T1 (modality T1CE).
_MSLUB_FILE = re.compile(r"^(?:(patient\d{2})_)?(T1W|T1WKS|T2W|FLAIR|consensus_gt|brainmask)" + NIFTI + "$")
_MSLUB_TRANSFORM = re.compile(r"^(?:(patient\d{2})_)?(T1W|T1WKS|T2W)_to_FLAIR\.txt$")
_MSLUB_MODALITIES = {"T1W": "T1", "T1WKS": "T1CE", "T2W": "T2", "FLAIR": "FLAIR"}


def scan_mslub(root: Path, files: list[Path]) -> DatasetScan:
    scan = DatasetScan("mslub", root)
    groups: dict[Path, dict[str, Path]] = {}
    for path in files:
        folders = path.relative_to(root).parts[:-1]
        patients = [i for i, name in enumerate(folders) if re.fullmatch(r"patient\d{2}", name)]
        lower = [name.lower() for name in folders]
        if any(name.startswith("longit") for name in lower):
            scan.ignore([path], "MSLUB longitudinal lesion-change database (a different dataset)")
            continue
        if not patients:
            continue
        patient = folders[patients[-1]]
        if "mni" in lower:
            scan.ignore([path], "MSLUB copy registered to MNI by the open_ms_data mirror (not listed)")
            continue
        match, transform = _MSLUB_FILE.match(path.name), _MSLUB_TRANSFORM.match(path.name)
        prefix = (match or transform).group(1) if (match or transform) else None
        if prefix not in (None, patient):
            continue
        if transform is not None:
            scan.ignore([path], "MSLUB affine transform parameters (not read)")
        elif match is not None and "raw" in lower:
            scan.ignore(
                [path],
                "MSLUB raw image in its original space (the label is on the co-registered "
                "FLAIR grid; the co-registered copy is listed)",
            )
        elif match is not None:
            groups.setdefault(root.joinpath(*folders[: patients[-1] + 1]), {})[match.group(2)] = path
    for folder, found in sorted(groups.items()):
        label = found.get("consensus_gt")
        if label is None:
            scan.ignore(found.values(), NO_LABEL.format("MSLUB consensus_gt"))
            continue
        scan.use(label)
        for kind, modality in _MSLUB_MODALITIES.items():
            if kind in found:
                scan.add(
                    DatasetRow(
                        path=found[kind],
                        subject=folder.name,
                        dataset="mslub",
                        modality=modality,
                        site="Ljubljana",
                        mask=found.get("brainmask"),
                        label=label,
                        lesion_type="ms",
                    )
                )
    return scan


MSLUB = Layout(
    name="mslub",
    title="MSLUB (Ljubljana 3D MR MS database)",
    expected="patientXX/patientXX_{T1W,T1WKS,T2W,FLAIR,consensus_gt}.nii.gz folders (or the open_ms_data "
    "mirror's cross_sectional/coregistered/patientXX/{FLAIR,...}.nii.gz)",
    source="Lesjak et al. 2018, Neuroinformatics 16:51-63; "
    "https://lit.fe.uni-lj.si/en/research/resources/3D-MR-MS/",
    scan=scan_mslub,
)

# --------------------------------------------------------------------------------------------------- WMH 2017
# Layout: the WMH Segmentation Challenge (https://wmh.isi.uu.nl; Kuijf et al. 2019, IEEE TMI 38:2556-2568),
# all data released in 2022 at https://doi.org/10.34894/AECRSD: {training,test}/<site>/[<scanner>/]<id>/ with
# pre/{FLAIR,T1}.nii.gz (bias-corrected; T1 registered to the FLAIR), orig/ (original images and the 3D T1
# transform) and wmh.nii.gz, the reference standard on the FLAIR grid. Sites: Utrecht, Singapore, and
# Amsterdam with scanner folders GE3T, GE1T5, Philips_VU_PETMR_01 (site column "Amsterdam-<scanner>"); the
# 2017 training download had GE3T/ at the top level, also read as Amsterdam-GE3T. additional_annotations/
# (observers O3/O4) is ignored. wmh.nii.gz: 1 = WMH, 2 = other pathology (a rough mask the challenge ignores
# in evaluation). The label column points at wmh.nii.gz unchanged and the extra column label_ignore = 2 tells
# evaluation to leave those voxels out of both positives and negatives; an evaluation that reads label > 0
# would count them as lesion.
_WMH_SITES = {"utrecht": "Utrecht", "singapore": "Singapore", "amsterdam": "Amsterdam"}


def _wmh_site(root: Path, subject_dir: Path) -> tuple[str, str]:
    folders = (root.name, *subject_dir.relative_to(root).parts[:-1])
    site = scanner = partition = ""
    for i, name in enumerate(folders):
        lower = name.lower()
        if lower in ("training", "test"):
            partition = lower
        elif lower in _WMH_SITES:
            site = _WMH_SITES[lower]
            if site == "Amsterdam" and i + 1 < len(folders):
                scanner = folders[i + 1]
        elif lower == "ge3t" and not site:
            site, scanner = "Amsterdam", "GE3T"
    return (f"{site}-{scanner}" if scanner else site), partition


def scan_wmh2017(root: Path, files: list[Path]) -> DatasetScan:
    scan = DatasetScan("wmh2017", root, extra_columns=("partition", "label_ignore"))
    subjects: dict[Path, dict[str, Path]] = {}
    for path in files:
        folders = [name.lower() for name in path.relative_to(root).parts[:-1]]
        if "additional_annotations" in folders or root.name.lower() == "additional_annotations":
            scan.ignore([path], "WMH additional observers' annotations (not the reference standard)")
        elif path.name == "wmh.nii.gz":
            subjects.setdefault(path.parent, {})["wmh"] = path
        elif path.parent.name in ("pre", "orig") and path.parent != root:
            subjects.setdefault(path.parent.parent, {})[f"{path.parent.name}/{path.name}"] = path
    for folder, found in sorted(subjects.items()):
        if "wmh" not in found and "pre/FLAIR.nii.gz" not in found:
            continue  # a pre/ or orig/ folder that is not a WMH subject's: left unclassified
        if "wmh" not in found:
            scan.ignore(found.values(), NO_LABEL.format("wmh.nii.gz"))
            continue
        site, partition = _wmh_site(root, folder)
        subject = "_".join(p for p in (partition, site, folder.name) if p)
        for key, modality in (("pre/FLAIR.nii.gz", "FLAIR"), ("pre/T1.nii.gz", "T1")):
            if key in found:
                scan.add(
                    DatasetRow(
                        path=found[key],
                        subject=subject,
                        dataset="wmh2017",
                        modality=modality,
                        site=site or None,
                        label=found["wmh"],
                        lesion_type="svd",
                        extra=(("partition", partition), ("label_ignore", "2")),
                    )
                )
        for key, path in found.items():
            if key.startswith("orig/"):
                scan.ignore(
                    [path], "WMH orig/ image (the organisers' pre/ copy on the label's grid is listed)"
                )
            elif key.startswith("pre/3DT1"):
                scan.ignore([path], "WMH 3D T1 on its own grid, not the FLAIR grid of wmh.nii.gz")
    return scan


WMH2017 = Layout(
    name="wmh2017",
    title="the WMH Segmentation Challenge 2017 data",
    expected="<site>/[<scanner>/]<id>/{pre/FLAIR.nii.gz,pre/T1.nii.gz,wmh.nii.gz} subject folders "
    "(sites Utrecht, Singapore, Amsterdam)",
    source="Kuijf et al. 2019, IEEE TMI 38:2556; https://wmh.isi.uu.nl; https://doi.org/10.34894/AECRSD",
    scan=scan_wmh2017,
)
