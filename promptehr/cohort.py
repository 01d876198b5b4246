"""The built-in synthetic cohort: an explicit latent-state (hidden Markov) model of ICU patients.

This is the default dataset when no MIMIC path is configured. It is a generative model whose
parameters stay accessible, so that a benchmark can compute the EXACT probability of a patient's next
visit under it (the Bayes-optimal predictor a trained model is compared with).

Generative process (`CohortModel.sample`; `CohortModel.next_visit_log_prob` computes probabilities
under exactly this process)
------------------------------------------------------------------------------------------------------
1. Demographics (fixed for the whole patient; `age` is the age at the first admission, as in
   `promptehr.data`):
   - with probability `neonate_share` the patient is a neonate: age 0.0, male with `neonate_male_share`;
   - otherwise an adult, male with `adult_male_share`; age = `age_top` (90, MIMIC's cap: MIMIC shifts
     ages above 89, `data.MAX_AGE`) with probability `age_top_share`, else
     `age_min_adult + (age_top - age_min_adult) * Beta(age_beta_a, age_beta_b)` rounded to 0.1 year.
2. Hidden phenotype state of the first visit, z_0 ~ `initial_state_probs(age, sex)`: a softmax over the
   states *eligible* for the patient of
       init_logit[s] + init_logit_age[s] * (age - 60) / 10 + init_logit_male[s] * [sex == "M"].
   State s is eligible iff `state_min_age[s] <= age < state_max_age[s]` and `state_sex[s]` is None or
   equals sex (the neonatal state iff age < 1; the obstetric state only for women aged 15 to 45).
3. Visit k in state z_k: each code c of the vocabulary appears independently with probability
       p_c = allowed_c(age, sex) * (1 - (1 - code_prob[z_k, c]) * (1 - persistence[c] * [c in visit k-1]))
   (`code_probs`): a chronic code present in the previous visit persists with probability at least
   `persistence[c]` (0.7 to 0.85 for chronic codes, 0 for acute ones), in any state; codes that
   `code_allowed` rules out for the patient's age and sex have probability exactly 0. The visit is
   redrawn until it is non-empty (rejection), so P(visit) = prod_c Bernoulli / (1 - prod_c (1 - p_c)).
   Codes are emitted in random order (a visit is a set).
4. Number of visits: after visit k (state z_k) another visit follows with probability
   `continue_prob[z_k]` while k + 1 < `max_visits`, else the patient ends. Visits are geometric-ish
   with a state-dependent rate: chronic states (heart failure/renal, liver, cancer, lung) come back
   more often than obstetric or neonatal stays.
5. The next visit's state: z_{k+1} ~ transition_matrix(age, sex)[z_k], the base `transition` matrix
   (sticky: the state usually persists, sometimes progresses, e.g. cardiometabolic -> heart
   failure/renal) restricted to the states eligible for the patient and renormalised.

Code restrictions (`code_allowed`, reused by the validity report; bounds from the CMS Medicare Code
Editor's age and sex edits): pregnancy codes (630-679, V22-V24, V27-V28) only for women aged 12 to 55;
newborn/perinatal codes (760-779, V29-V39) only below age 1; male-only codes (prostate 185, testis
186-187, male genital organs 600-608) only for men; female-only codes (female breast 174, uterus/
ovary/other female genital cancers 179-184, their benign tumours 218-221, female genital disorders
614-629) only for women. In the cohort, pregnancy codes come only from the obstetric state, i.e.
women aged 15 to 45, strictly inside the rule's window.

All code strings are real ICD-9-CM diagnosis codes in MIMIC-III format (no dot); descriptions are the
CMS short titles. A few (0414, 2554, 7793) were split into 5-digit codes in later ICD-9-CM releases
but are the form MIMIC-III (2001-2012) records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from promptehr.data import MAX_AGE, Patient

# ----------------------------------------------------------------------------------------------
# Age / sex rules for codes (shared with the validity report)
# ----------------------------------------------------------------------------------------------

PREGNANCY_AGE_RANGE = (12.0, 55.0)  # inclusive: Medicare Code Editor maternity edit
NEWBORN_AGE_LIMIT = 1.0             # newborn/perinatal codes only for age < 1 year
OBSTETRIC_STATE_AGES = (15.0, 46.0) # the obstetric state: women with 15 <= age < 46 (15 to 45)

_PREGNANCY_V = ("V22", "V23", "V24", "V27", "V28")
_NEWBORN_V = ("V29", "V30", "V31", "V32", "V33", "V34", "V35", "V36", "V37", "V38", "V39")


def code_restriction(code: str) -> str | None:
    """The age/sex rule a code falls under: "pregnancy", "newborn", "male", "female" or None."""
    if code[:3] in _PREGNANCY_V:
        return "pregnancy"
    if code[:3] in _NEWBORN_V:
        return "newborn"
    if len(code) >= 3 and code[:3].isdigit():
        cat = int(code[:3])
        if 630 <= cat <= 679:
            return "pregnancy"
        if 760 <= cat <= 779:
            return "newborn"
        if 185 <= cat <= 187 or 600 <= cat <= 608:
            return "male"
        if cat == 174 or 179 <= cat <= 184 or 218 <= cat <= 221 or 614 <= cat <= 629:
            return "female"
    return None


def code_allowed(code: str, age: float, sex: str) -> bool:
    """Whether `code` is clinically possible for a patient of this age (years) and sex ("M"/"F").

    Pregnancy codes: women aged 12 to 55 inclusive; newborn codes: age < 1; male-only and female-only
    codes: that sex. Every other code is allowed for everyone.
    """
    rule = code_restriction(code)
    if rule is None:
        return True
    if rule == "pregnancy":
        return sex == "F" and PREGNANCY_AGE_RANGE[0] <= age <= PREGNANCY_AGE_RANGE[1]
    if rule == "newborn":
        return age < NEWBORN_AGE_LIMIT
    if rule == "male":
        return sex == "M"
    return sex == "F"  # female


# ----------------------------------------------------------------------------------------------
# The default model's code tables: "code  p  CMS short title" per line
# ----------------------------------------------------------------------------------------------

# Per-state Bernoulli probability of each code in a visit of that state (before persistence and the
# age/sex rules). A state's expected number of codes is about 4 (obstetric) to 8.5 (sepsis), plus
# the shared tail below.
STATE_CODE_TABLES: dict[str, str] = {
    "cardiometabolic": """
41401  0.70  Crnry athrscl natve vssl
4019   0.50  Hypertension NOS
2724   0.45  Hyperlipidemia NEC/NOS
25000  0.30  DMII wo cmp nt st uncntr
42731  0.25  Atrial fibrillation
41071  0.31  Subendo infarct, initial
412    0.20  Old myocardial infarct
V4581  0.22  Aortocoronary bypass
V4582  0.21  Status-post ptca
4111   0.16  Intermed coronary synd
4139   0.11  Angina pectoris NEC/NOS
41041  0.09  AMI inferior wall, init
41011  0.09  AMI anterior wall, init
2720   0.15  Pure hypercholesterolem
3051   0.22  Tobacco use disorder
V1582  0.22  History of tobacco use
27800  0.09  Obesity NOS
27801  0.11  Morbid obesity
25002  0.11  DMII wo cmp uncntrld
25060  0.11  DMII neuro nt st uncntrl
3572   0.11  Neuropathy in diabetes
25040  0.07  DMII renl nt st uncntrld
V5867  0.18  Long-term use of insulin
4240   0.16  Mitral valve disorder
4241   0.18  Aortic valve disorder
9971   0.11  Surg compl-heart
99811  0.05  Hemorrhage complic proc
4271   0.07  Parox ventric tachycard
42732  0.07  Atrial flutter
42789  0.07  Cardiac dysrhythmias NEC
4254   0.05  Prim cardiomyopathy NEC
4439   0.11  Periph vascular dis NOS
44021  0.05  Ath ext ntv at w claudct
43310  0.07  Ocl crtd art wo infrct
4168   0.07  Chr pulmon heart dis NEC
32723  0.11  Obstructive sleep apnea
2851   0.18  Ac posthemorrhag anemia
2859   0.18  Anemia NOS
5849   0.16  Acute kidney failure NOS
41400  0.09  Cor ath unsp vsl ntv/gft
4280   0.18  CHF NOS
4589   0.07  Hypotension NOS
78551  0.05  Cardiogenic shock
4275   0.03  Cardiac arrest
V4501  0.03  Status cardiac pacemaker
V5861  0.11  Long-term use anticoagul
V5866  0.14  Long-term use of aspirin
""",
    "heart_failure_renal": """
4280   0.80  CHF NOS
42731  0.50  Atrial fibrillation
40391  0.37  Hyp kid NOS w cr kid V
40390  0.23  Hy kid NOS w cr kid I-IV
4019   0.25  Hypertension NOS
5849   0.45  Acute kidney failure NOS
5859   0.23  Chronic kidney dis NOS
5853   0.15  Chr kidney dis stage III
5854   0.10  Chr kidney dis stage IV
5856   0.20  End stage renal disease
V4511  0.20  Renal dialysis status
42832  0.22  Chr diastolic hrt fail
42833  0.15  Ac on chr diast hrt fail
42822  0.14  Chr systolic hrt failure
42823  0.14  Ac on chr syst hrt fail
42830  0.06  Diastolc hrt failure NOS
4254   0.12  Prim cardiomyopathy NEC
4240   0.23  Mitral valve disorder
4241   0.20  Aortic valve disorder
3970   0.12  Tricuspid valve disease
41401  0.35  Crnry athrscl natve vssl
25000  0.30  DMII wo cmp nt st uncntr
2724   0.25  Hyperlipidemia NEC/NOS
V5861  0.30  Long-term use anticoagul
2762   0.20  Acidosis
2767   0.20  Hyperpotassemia
2761   0.15  Hyposmolality
2859   0.18  Anemia NOS
28521  0.20  Anemia in chr kidney dis
5119   0.20  Pleural effusion NOS
4168   0.12  Chr pulmon heart dis NEC
4160   0.07  Prim pulm hypertension
4271   0.10  Parox ventric tachycard
V4502  0.07  Status autm crd dfbrltr
V4501  0.07  Status cardiac pacemaker
78551  0.10  Cardiogenic shock
2768   0.10  Hypopotassemia
2749   0.12  Gout NOS
311    0.10  Depressive disorder NEC
V4581  0.12  Aortocoronary bypass
412    0.12  Old myocardial infarct
""",
    "pulmonary": """
496    0.50  Chr airway obstruct NEC
49121  0.32  Obs chr bronc w(ac) exac
49122  0.10  Obs chr bronc w ac bronc
51881  0.69  Acute respiratry failure
51884  0.19  Acute & chronc resp fail
51883  0.14  Chronic respiratory fail
486    0.50  Pneumonia, organism NOS
5070   0.24  Food/vomit pneumonitis
49390  0.19  Asthma NOS
49392  0.10  Asthma NOS w (ac) exac
4168   0.14  Chr pulmon heart dis NEC
5119   0.22  Pleural effusion NOS
V4611  0.14  Respirator depend status
V1582  0.24  History of tobacco use
3051   0.20  Tobacco use disorder
41519  0.12  Pulm embol/infarct NEC
4019   0.35  Hypertension NOS
42731  0.18  Atrial fibrillation
4280   0.20  CHF NOS
2762   0.19  Acidosis
2763   0.14  Alkalosis
32723  0.14  Obstructive sleep apnea
5180   0.12  Pulmonary collapse
51889  0.07  Other lung disease NEC
515    0.12  Postinflam pulm fibrosis
V1261  0.05  Prsnl hx recur pneumonia
4829   0.07  Bacterial pneumonia NOS
48241  0.07  Meth sus pneum d/t Staph
79902  0.07  Hypoxemia
78609  0.07  Respiratory abnorm NEC
3004   0.12  Dysthymic disorder
311    0.14  Depressive disorder NEC
30000  0.10  Anxiety state NOS
25000  0.15  DMII wo cmp nt st uncntr
2724   0.15  Hyperlipidemia NEC/NOS
V5865  0.12  Long-term use steroids
4928   0.12  Emphysema NEC
5121   0.05  Iatrogenic pneumothorax
V440   0.10  Tracheostomy status
""",
    "sepsis": """
0389   0.75  Septicemia NOS
99591  0.39  Sepsis
99592  0.59  Severe sepsis
78552  0.46  Septic shock
5990   0.52  Urin tract infection NOS
5849   0.55  Acute kidney failure NOS
2762   0.39  Acidosis
486    0.32  Pneumonia, organism NOS
0380   0.09  Streptococcal septicemia
03842  0.12  E coli septicemia
03811  0.09  Meth susc Staph aur sept
03812  0.06  MRSA septicemia
03843  0.04  Pseudomonas septicemia
0414   0.21  E. coli infection NOS
04111  0.09  Mth sus Stph aur els/NOS
04104  0.06  Enterococcus group d
00845  0.12  Int inf clstrdium dfcile
2875   0.21  Thrombocytopenia NOS
2866   0.06  Defibrination syndrome
2760   0.20  Hyperosmolality
2761   0.20  Hyposmolality
2768   0.21  Hypopotassemia
2767   0.12  Hyperpotassemia
51881  0.40  Acute respiratry failure
4019   0.30  Hypertension NOS
4280   0.15  CHF NOS
42731  0.20  Atrial fibrillation
25000  0.15  DMII wo cmp nt st uncntr
2859   0.20  Anemia NOS
70703  0.11  Pressure ulcer, low back
70722  0.04  Pressure ulcer, stage II
6826   0.09  Cellulitis of leg
6827   0.06  Cellulitis of foot
5845   0.11  Ac kidny fail, tubr necr
5070   0.12  Food/vomit pneumonitis
2639   0.11  Protein-cal malnutr NOS
2930   0.11  Delirium d/t other cond
V090   0.09  Inf mcrg rstn pncllins
7907   0.09  Bacteremia
99662  0.06  React-oth vasc dev/graft
""",
    "gi_liver": """
5715   0.49  Cirrhosis of liver NOS
5712   0.49  Alcohol cirrhosis liver
07054  0.34  Chrnc hpt C wo hpat coma
07070  0.09  Hpt C w/o hepat coma NOS
5723   0.26  Portal hypertension
5722   0.22  Hepatic encephalopathy
4560   0.09  Esophag varices w bleed
45620  0.14  Bleed esoph var oth dis
45621  0.14  Esoph varice oth dis NOS
5724   0.11  Hepatorenal syndrome
78959  0.42  Ascites NEC
5789   0.34  Gastrointest hemorr NOS
5780   0.18  Hematemesis
5781   0.18  Blood in stool
53140  0.07  Chr stomach ulc w hem
53240  0.07  Chr duoden ulcer w hem
5770   0.21  Acute pancreatitis
5771   0.09  Chronic pancreatitis
57400  0.09  Cholelith w ac cholecyst
5761   0.09  Cholangitis
30390  0.34  Alcoh dep NEC/NOS-unspec
30500  0.18  Alcohol abuse-unspec
29181  0.09  Alcohol withdrawal
2851   0.34  Ac posthemorrhag anemia
2859   0.21  Anemia NOS
2875   0.34  Thrombocytopenia NOS
2761   0.21  Hyposmolality
5849   0.42  Acute kidney failure NOS
2800   0.11  Chr blood loss anemia
2639   0.14  Protein-cal malnutr NOS
56723  0.07  Spontan bact peritonitis
53081  0.15  Esophageal reflux
4019   0.15  Hypertension NOS
25000  0.10  DMII wo cmp nt st uncntr
5601   0.07  Paralytic ileus
5609   0.05  Intestinal obstruct NOS
56211  0.09  Dvrtcli colon w/o hmrhg
56212  0.07  Dvrtclo colon w hmrhg
5693   0.09  Rectal & anal hemorrhage
5718   0.09  Chronic liver dis NEC
""",
    "oncology": """
1970   0.39  Secondary malig neo lung
1985   0.30  Secondary malig neo bone
1977   0.30  Second malig neo liver
1983   0.21  Sec mal neo brain/spine
1976   0.14  Sec mal neo peritoneum
1962   0.11  Mal neo lymph intra-abd
1961   0.11  Mal neo lymph-intrathor
1629   0.30  Mal neo bronch/lung NOS
1623   0.11  Mal neo upper lobe lung
1749   0.21  Malign neopl breast NOS
1539   0.16  Malignant neo colon NOS
1541   0.09  Malignant neopl rectum
1579   0.14  Malig neo pancreas NOS
1550   0.11  Mal neo liver, primary
185    0.21  Malign neopl prostate
1890   0.09  Malig neopl kidney
20280  0.11  Oth lymp unsp xtrndl org
20300  0.14  Mult mye w/o achv rmson
20500  0.11  Ac myl leuk wo achv rmsn
20410  0.09  Ch lym leuk wo achv rmsn
V1011  0.09  Hx-bronchogenic malignan
V103   0.16  Hx of breast malignancy
28800  0.09  Neutropenia NOS
28803  0.14  Drug induced neutropenia
28411  0.14  Antin chemo indcd pancyt
2859   0.35  Anemia NOS
2875   0.24  Thrombocytopenia NOS
V5811  0.16  Antineoplastic chemo enc
E9331  0.14  Adv eff antineoplastic
1120   0.11  Thrush
5119   0.21  Pleural effusion NOS
51181  0.14  Malignant pleural effusn
4019   0.30  Hypertension NOS
2724   0.10  Hyperlipidemia NEC/NOS
25000  0.10  DMII wo cmp nt st uncntr
3383   0.14  Neoplasm related pain
27651  0.21  Dehydration
7994   0.11  Cachexia
V667   0.21  Encountr palliative care
45340  0.14  Ac DVT/embl low ext NOS
41519  0.11  Pulm embol/infarct NEC
1991   0.09  Malignant neoplasm NOS
""",
    "neuro_trauma": """
431    0.26  Intracerebral hemorrhage
430    0.22  Subarachnoid hemorrhage
4321   0.18  Subdural hemorrhage
43491  0.22  Crbl art ocl NOS w infrc
43411  0.14  Crbl emblsm w infrct
43311  0.09  Ocl crtd art w infrct
3481   0.18  Anoxic brain damage
3484   0.11  Compression of brain
3485   0.14  Cerebral edema
34590  0.22  Epilep NOS w/o intr epil
78039  0.22  Convulsions NEC
7802   0.11  Syncope and collapse
85220  0.14  Traumatic subdural hem
85200  0.14  Traum subarachnoid hem
85221  0.09  Subdural hem w/o coma
80502  0.06  Fx c2 vertebra-closed
80703  0.09  Fracture three ribs-clos
82021  0.11  Intertrochanteric fx-cl
E8889  0.22  Fall NOS
E8859  0.14  Fall from slipping NEC
E8120  0.11  Mv collision NOS-driver
E8490  0.18  Accident in home
E8497  0.11  Accid in resident instit
30500  0.14  Alcohol abuse-unspec
30390  0.18  Alcoh dep NEC/NOS-unspec
29181  0.09  Alcohol withdrawal
96509  0.09  Poisoning-opiates NEC
9694   0.09  Pois-benzodiazepine tran
E9500  0.06  Poison-analgesics
E8502  0.06  Acc poison-opiates NEC
3310   0.09  Alzheimer's disease
29410  0.11  Dementia w/o behav dist
3320   0.09  Paralysis agitans
34290  0.11  Unsp hemiplga unspf side
78097  0.14  Altered mental status
7843   0.14  Aphasia
4019   0.45  Hypertension NOS
2724   0.20  Hyperlipidemia NEC/NOS
42731  0.18  Atrial fibrillation
25000  0.12  DMII wo cmp nt st uncntr
V5861  0.18  Long-term use anticoagul
2761   0.18  Hyposmolality
5070   0.22  Food/vomit pneumonitis
""",
    "obstetric": """
V270   0.77  Deliver-single liveborn
650    0.37  Normal delivery
V220   0.06  Supervis normal 1st preg
V221   0.06  Supervis oth normal preg
64413  0.20  Threat labor NEC-antepar
64893  0.12  Oth curr cond-antepartum
64891  0.16  Oth curr cond-delivered
65421  0.23  Prev c-delivery-delivrd
66401  0.16  Del w 1 deg lacerat-del
66411  0.10  Del w 2 deg lacerat-del
64243  0.10  Mild/NOS preeclamp-antep
64241  0.10  Mild/NOS preeclamp-deliv
64251  0.12  Severe preeclamp-deliver
64881  0.16  Abn glucose toler-deliv
64801  0.06  Diabetes-delivered
64821  0.16  Anemia-delivered
64421  0.10  Early onset delivery-del
65221  0.08  Breech presentat-deliver
65971  0.16  Abn ftl hrt rate/rhy-del
65961  0.10  Elderly multigravida-del
66612  0.06  Postpa hem NEC-del w p/p
66614  0.04  Postpart hem NEC-postpar
64511  0.08  Post term preg-del
65811  0.10  Prem rupt membran-deliv
65651  0.06  Poor fetal growth-deliv
64661  0.06  Gu infection-delivered
63490  0.04  Spon abort uncompl-unsp
2851   0.16  Ac posthemorrhag anemia
""",
    "neonatal": """
V3000  0.63  Single lb in-hosp w/o cs
V3001  0.52  Single lb in-hosp w cs
V3101  0.08  Twin-mate lb-in hos w cs
V3100  0.05  Twin-mate lb-hosp w/o cs
V053   0.87  Need prphyl vc vrl hepat
V290   0.74  NB obsrv suspct infect
7742   0.45  Neonat jaund preterm del
7746   0.24  Fetal/neonatal jaund NOS
7706   0.19  NB transitory tachypnea
7707   0.05  Perinatal chr resp dis
769    0.16  Respiratory distress syn
76519  0.13  Preterm NEC 2500+g
76518  0.10  Preterm NEC 2000-2499g
76517  0.07  Preterm NEC 1750-1999g
76516  0.05  Preterm NEC 1500-1749g
76515  0.03  Preterm NEC 1250-1499g
76527  0.07  33-34 comp wks gestation
76528  0.10  35-36 comp wks gestation
76526  0.07  31-32 comp wks gestation
76525  0.03  29-30 comp wks gestation
7793   0.19  Feeding problems in newborn
77081  0.08  Primary apnea of newborn
77082  0.05  Other apnea of newborn
7756   0.13  Neonatal hypoglycemia
V293   0.08  NB obs genetc/metabl cnd
7470   0.08  Patent ductus arteriosus
7455   0.05  Secundum atrial sept def
7661   0.05  Heavy-for-date infan NEC
7784   0.05  NB temp regulat dis NEC
77989  0.03  Perinatal condition NEC
77181  0.03  NB septicemia [sepsis]
77183  0.03  Bacteremia of newborn
""",
}

# Comorbidities and a long tail of acute/rare codes shared by every adult state (probability scaled by
# SHARED_TAIL_SCALE per state): p_code = 1 - (1 - p_state) * (1 - scale * p_shared).
SHARED_TAIL_TABLE = """
53081  0.080  Esophageal reflux
2449   0.070  Hypothyroidism NOS
311    0.060  Depressive disorder NEC
30000  0.045  Anxiety state NOS
3004   0.030  Dysthymic disorder
V4986  0.045  Do not resusctate status
E8798  0.045  Abn react-procedure NEC
E8781  0.030  Abn react-artif implant
99859  0.030  Other postop infection
2749   0.045  Gout NOS
7242   0.030  Lumbago
V1251  0.030  Hx-ven thrombosis/embols
V1254  0.030  Hx TIA/stroke w/o resid
V4364  0.030  Joint replaced hip
4589   0.045  Hypotension NOS
45829  0.045  Iatrogenc hypotnsion NEC
78820  0.030  Retention urine NOS
60000  0.060  BPH w/o urinary obs/LUTS
60001  0.022  BPH w urinary obs/LUTS
6010   0.011  Acute prostatitis
6021   0.011  Prostatic congest/hemorr
6256   0.022  Fem stress incontinence
2189   0.030  Uterine leiomyoma NOS
6202   0.022  Ovarian cyst NEC/NOS
6271   0.022  Postmenopausal bleeding
7850   0.030  Tachycardia NOS
78060  0.030  Fever NOS
78791  0.022  Diarrhea
78701  0.022  Nausea with vomiting
78900  0.022  Abdmnal pain unspcf site
78650  0.022  Chest pain NOS
78659  0.022  Chest pain NEC
73300  0.045  Osteoporosis NOS
7140   0.022  Rheumatoid arthritis
7100   0.011  Syst lupus erythematosus
5641   0.011  Irritable bowel syndrome
5533   0.022  Diaphragmatic hernia
56400  0.022  Constipation NOS
5680   0.011  Peritoneal adhesions
5589   0.011  Noninf gastroenterit NEC
5920   0.011  Calculus of kidney
5921   0.011  Calculus of ureter
591    0.011  Hydronephrosis
2554   0.011  Corticoadrenal insufficiency
2752   0.022  Dis magnesium metabolism
27542  0.011  Hypercalcemia
27541  0.011  Hypocalcemia
2753   0.022  Dis phosphorus metabol
2869   0.022  Coagulat defect NEC/NOS
28860  0.022  Leukocytosis NOS
3331   0.011  Tremor NEC
34830  0.022  Encephalopathy NOS
3540   0.011  Carpal tunnel syndrome
3659   0.022  Glaucoma NOS
36250  0.011  Macular degeneration NOS
3669   0.011  Cataract NOS
3899   0.011  Hearing loss NOS
4210   0.011  Ac/subac bact endocard
4239   0.011  Pericardial disease NOS
4264   0.022  Rt bundle branch block
4293   0.011  Cardiomegaly
4660   0.011  Acute bronchitis
4779   0.022  Allergic rhinitis NOS
481    0.011  Pneumococcal pneumonia
4821   0.011  Pseudomonal pneumonia
4870   0.006  Influenza with pneumonia
51851  0.011  Ac resp flr fol trma/srg
51919  0.011  Trachea & bronch dis NEC
53010  0.011  Esophagitis, unspecified
53390  0.011  Peptic ulcer NOS
55090  0.011  Unilat inguinal hernia
5990   0.045  Urin tract infection NOS
71590  0.030  Osteoarthros NOS-unspec
71596  0.011  Osteoarthros NOS-l/leg
7245   0.022  Backache NOS
7291   0.011  Myalgia and myositis NOS
7295   0.011  Pain in limb
78052  0.022  Insomnia NOS
78079  0.011  Malaise and fatigue NEC
7823   0.011  Edema
78559  0.011  Shock w/o trauma NEC
7862   0.011  Cough
78703  0.011  Vomiting alone
79092  0.011  Abnrml coagultion prfile
9584   0.006  Traumatic shock
99731  0.006  Ventltr assoc pneumonia
E8782  0.011  Abn react-anastom/graft
E8788  0.022  Abn react-surg proc NEC
E9320  0.011  Adv eff corticosteroids
E9342  0.011  Adv eff anticoagulants
V103   0.022  Hx of breast malignancy
V1201  0.011  Prsnl hst tuberculosis
V1204  0.011  Hx Methicln resist Staph
V1259  0.011  Hx-circulatory dis NEC
V1582  0.030  History of tobacco use
V1588  0.022  Personal history of fall
V420   0.011  Kidney transplant status
V427   0.006  Liver transplant status
V433   0.022  Heart valve replac NEC
V440   0.011  Tracheostomy status
V441   0.011  Gastrostomy status
V442   0.006  Ileostomy status
V443   0.006  Colostomy status
V5865  0.022  Long-term use steroids
V5866  0.045  Long-term use of aspirin
V5869  0.030  Long-term use meds NEC
V667   0.011  Encountr palliative care
4011   0.022  Benign hypertension
4414   0.006  Abdom aortic aneurysm
45981  0.011  Venous insufficiency NOS
72887  0.006  Muscle weakness-general
7840   0.011  Headache
8208   0.006  Fx neck of femur NOS-cl
8500   0.006  Concussion w/o coma
99664  0.006  React-indwell urin cath
E8849  0.006  Fall-1 level to oth NEC
V4365  0.006  Joint replaced knee
V462   0.006  Depend-supplement oxygen
V5863  0.006  Lng use antiplte/thrmbtc
"""

# Chronic codes and their persistence rho_c: present in the previous visit, the code reappears with
# probability 1 - (1 - p)(1 - rho_c) >= rho_c. Every code not listed is acute (rho_c = 0).
CHRONIC_STRONG = 0.85  # lifelong diagnoses, cancers, organ failure, device/transplant/medication status
CHRONIC_MODERATE = 0.7  # chronic but inconsistently coded from one admission to the next
CHRONIC_CODES: dict[float, str] = {
    CHRONIC_STRONG: """
        4019 4011 25000 25002 25040 25060 3572 V5867 2724 2720 41401 41400 412 V4581 V4582
        42731 4280 42822 42832 4254 40390 40391 5859 5853 5854 5856 V4511 28521
        496 4928 515 51883 V4611 V440 49390 2449 V5861 V5866 V5863 V5865
        5715 5712 5718 07054 07070 5723 30390
        1970 1985 1977 1983 1976 1961 1962 1629 1623 1749 1539 1541 1579 1550 185 1890
        20280 20300 20410 1991 V1011 V103
        3310 29410 3320 34590 34290 4240 4241 3970 4168 4160 V4501 V4502 V433 V420 V427
        V441 V442 V443 V1251 V1254 V4364 V4365 7140 7100 60000 60001 V1582 3051 32723
        4439 44021 V4986 2189 73300
    """,
    CHRONIC_MODERATE: """
        53081 311 3004 30000 2749 27800 27801 2859 2875 71590 V5869 3659 36250 3669 3899
        4779 7242 4264
    """,
}

STATE_NAMES = (
    "cardiometabolic", "heart_failure_renal", "pulmonary", "sepsis", "gi_liver",
    "oncology", "neuro_trauma", "obstetric", "neonatal",
)

# Per-state parameters of the default model, in STATE_NAMES order:
#              init_logit  per-10y  male   min_age max_age sex   continue  shared-tail scale
STATE_PARAMS = {
    "cardiometabolic":     (0.6,  0.15,  0.4,  1.0, 999.0, None, 0.20, 1.0),
    "heart_failure_renal": (0.0,  0.45,  0.0,  1.0, 999.0, None, 0.33, 1.0),
    "pulmonary":           (0.0,  0.15,  0.0,  1.0, 999.0, None, 0.30, 1.0),
    "sepsis":              (0.2,  0.15,  0.0,  1.0, 999.0, None, 0.20, 1.0),
    "gi_liver":            (-0.3, -0.25, 0.3,  1.0, 999.0, None, 0.33, 1.0),
    "oncology":            (-0.3, 0.0,   0.0,  1.0, 999.0, None, 0.30, 1.0),
    "neuro_trauma":        (0.3,  -0.10, 0.3,  1.0, 999.0, None, 0.12, 1.0),
    "obstetric":           (0.8,  0.0,   0.0,  OBSTETRIC_STATE_AGES[0], OBSTETRIC_STATE_AGES[1], "F", 0.06, 0.5),
    "neonatal":            (0.0,  0.0,   0.0,  0.0, NEWBORN_AGE_LIMIT, None, 0.04, 0.0),
}

# Base visit-to-visit transitions (rows: from, columns: to; STATE_NAMES order; rows sum to 1).
# Sticky; cardiometabolic progresses to heart failure/renal; any state can be followed by sepsis,
# the least sticky state (an infection resolves; the underlying chronic phenotype comes back).
# Neonates stay neonatal (later visits of an age-0 patient are NICU readmissions).
TRANSITION = np.array([
    # CM    HFR   PUL   SEP   GIL   ONC   NEU   OBS   NEO
    [0.72, 0.12, 0.03, 0.05, 0.02, 0.02, 0.04, 0.00, 0.00],  # cardiometabolic
    [0.04, 0.80, 0.04, 0.08, 0.01, 0.01, 0.02, 0.00, 0.00],  # heart_failure_renal
    [0.03, 0.06, 0.75, 0.10, 0.01, 0.03, 0.02, 0.00, 0.00],  # pulmonary
    [0.10, 0.12, 0.10, 0.45, 0.06, 0.06, 0.11, 0.00, 0.00],  # sepsis
    [0.02, 0.02, 0.02, 0.08, 0.80, 0.04, 0.02, 0.00, 0.00],  # gi_liver
    [0.01, 0.02, 0.04, 0.10, 0.03, 0.78, 0.02, 0.00, 0.00],  # oncology
    [0.06, 0.03, 0.03, 0.06, 0.02, 0.02, 0.78, 0.00, 0.00],  # neuro_trauma
    [0.02, 0.01, 0.01, 0.03, 0.02, 0.01, 0.05, 0.85, 0.00],  # obstetric
    [0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 1.00],  # neonatal
])

DEFAULT_MAX_VISITS = 20


def parse_code_table(text: str) -> dict[str, float]:
    """"code  p  description" lines -> {code: p}; blank lines are skipped."""
    table: dict[str, float] = {}
    for line in text.strip().splitlines():
        parts = line.split()
        if not parts:
            continue
        code, p = parts[0], float(parts[1])
        if code in table:
            raise ValueError(f"code {code} listed twice in one table")
        table[code] = p
    return table


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

def _logsumexp(x: np.ndarray, axis=None) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis) if axis is not None else out.reshape(())[()]


@dataclass
class CohortModel:
    """A hidden-Markov patient model; see the module docstring for the generative process.

    S = len(state_names) hidden states, C = len(codes) codes. All arrays are float64.
    """

    codes: list[str]                # (C,) ICD-9 codes, MIMIC-III format (no dot)
    state_names: list[str]          # (S,)
    init_logit: np.ndarray          # (S,) first-visit state log-weight at age 60, female
    init_logit_age: np.ndarray      # (S,) added per 10 years of age above 60 (subtracted below)
    init_logit_male: np.ndarray     # (S,) added for men
    state_min_age: np.ndarray       # (S,) state s is eligible iff state_min_age[s] <= age < state_max_age[s]
    state_max_age: np.ndarray       # (S,)
    state_sex: list[str | None]     # (S,) "M" / "F": state only for that sex; None: both
    transition: np.ndarray          # (S, S) base transition matrix, rows sum to 1 (restricted to the
                                    #        eligible states and renormalised per patient)
    code_prob: np.ndarray           # (S, C) Bernoulli probability of code c in a visit of state s, < 1
    persistence: np.ndarray         # (C,) rho_c in [0, 1): boost of a code present in the previous visit
    continue_prob: np.ndarray       # (S,) P(another visit follows a visit in state s), < 1
    max_visits: int = DEFAULT_MAX_VISITS  # no visit after the max_visits-th
    # demographics (used by `sample` only; probabilities are conditional on age and sex)
    neonate_share: float = 0.09     # P(age 0)
    neonate_male_share: float = 0.53
    adult_male_share: float = 0.56
    age_min_adult: float = 18.0
    age_top: float = MAX_AGE        # MIMIC caps ages at 90: a pile-up there
    age_top_share: float = 0.07     # share of adults at exactly age_top
    age_beta_a: float = 2.4         # adult age = age_min_adult + (age_top - age_min_adult) * Beta(a, b)
    age_beta_b: float = 1.6

    _index: dict[str, int] = field(init=False, repr=False)
    _restriction: list[str | None] = field(init=False, repr=False)
    _mask_cache: dict[tuple, np.ndarray] = field(init=False, repr=False)
    _emission_cache: dict[tuple, tuple] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        S, C = len(self.state_names), len(self.codes)
        self.init_logit = np.asarray(self.init_logit, dtype=np.float64).reshape(S)
        self.init_logit_age = np.asarray(self.init_logit_age, dtype=np.float64).reshape(S)
        self.init_logit_male = np.asarray(self.init_logit_male, dtype=np.float64).reshape(S)
        self.state_min_age = np.asarray(self.state_min_age, dtype=np.float64).reshape(S)
        self.state_max_age = np.asarray(self.state_max_age, dtype=np.float64).reshape(S)
        self.transition = np.asarray(self.transition, dtype=np.float64).reshape(S, S)
        self.code_prob = np.asarray(self.code_prob, dtype=np.float64).reshape(S, C)
        self.persistence = np.asarray(self.persistence, dtype=np.float64).reshape(C)
        self.continue_prob = np.asarray(self.continue_prob, dtype=np.float64).reshape(S)
        self.state_sex = list(self.state_sex)
        if len(self.state_sex) != S or any(x not in (None, "M", "F") for x in self.state_sex):
            raise ValueError("state_sex needs one of None/'M'/'F' per state")
        if len(set(self.codes)) != C:
            raise ValueError("codes must be distinct")
        if np.any(self.transition < 0) or not np.allclose(self.transition.sum(1), 1.0):
            raise ValueError("transition rows must be probability vectors")
        for name, arr in (("code_prob", self.code_prob), ("persistence", self.persistence),
                          ("continue_prob", self.continue_prob)):
            if np.any(arr < 0) or np.any(arr >= 1):
                raise ValueError(f"{name} must lie in [0, 1)")
        if self.max_visits < 1:
            raise ValueError("max_visits must be >= 1")
        self._index = {c: i for i, c in enumerate(self.codes)}
        self._restriction = [code_restriction(c) for c in self.codes]
        self._mask_cache = {}
        self._emission_cache = {}

    # -- sizes and lookups --------------------------------------------------------------------

    @property
    def n_states(self) -> int:
        return len(self.state_names)

    @property
    def n_codes(self) -> int:
        return len(self.codes)

    def code_index(self, code: str) -> int:
        return self._index[code]

    # -- demographics -------------------------------------------------------------------------

    @staticmethod
    def _demo_key(age: float, sex: str) -> tuple[bool, bool, bool]:
        """The facts the code rules depend on: (female, newborn age, pregnancy age)."""
        return (sex == "F", age < NEWBORN_AGE_LIMIT,
                PREGNANCY_AGE_RANGE[0] <= age <= PREGNANCY_AGE_RANGE[1])

    def _key_mask(self, key: tuple[bool, bool, bool]) -> np.ndarray:
        mask = self._mask_cache.get(key)
        if mask is None:
            female, newborn, preg_age = key
            ok = {None: True, "pregnancy": female and preg_age, "newborn": newborn,
                  "male": not female, "female": female}
            mask = np.array([ok[r] for r in self._restriction], dtype=np.float64)
            self._mask_cache[key] = mask
        return mask

    def allowed_mask(self, age: float, sex: str) -> np.ndarray:
        """(C,) 1.0 where `code_allowed(code, age, sex)`, else 0.0."""
        return self._key_mask(self._demo_key(age, sex))

    def eligible_states(self, age: float, sex: str) -> np.ndarray:
        """(S,) bool: states the patient can be in (age window and sex)."""
        sex_ok = np.array([s is None or s == sex for s in self.state_sex])
        return (self.state_min_age <= age) & (age < self.state_max_age) & sex_ok

    def initial_state_probs(self, age: float, sex: str) -> np.ndarray:
        """(S,) P(z_0 = s | age, sex)."""
        logits = self.init_logit + self.init_logit_age * (age - 60.0) / 10.0
        if sex == "M":
            logits = logits + self.init_logit_male
        eligible = self.eligible_states(age, sex)
        if not eligible.any():
            raise ValueError(f"no state is eligible for age={age}, sex={sex!r}")
        logits = np.where(eligible, logits, -np.inf)
        w = np.exp(logits - logits[eligible].max())
        return w / w.sum()

    def transition_matrix(self, age: float, sex: str) -> np.ndarray:
        """(S, S) P(z_{k+1} = t | z_k = s, age, sex): `transition` restricted to eligible states.

        Rows of ineligible states (never visited by this patient) and rows with no eligible target
        are all zero.
        """
        eligible = self.eligible_states(age, sex)
        T = self.transition * eligible[None, :]
        T = T * eligible[:, None]
        tot = T.sum(1, keepdims=True)
        return np.divide(T, tot, out=np.zeros_like(T), where=tot > 0)

    # -- visits given the state ---------------------------------------------------------------

    def code_probs(self, state: int, age: float, sex: str, previous_visit=None) -> np.ndarray:
        """(C,) Bernoulli probability of each code in a visit of `state`, before the non-empty
        conditioning: persistence boost for chronic codes of `previous_visit`, then the age/sex mask.
        Codes of `previous_visit` outside the vocabulary are ignored."""
        p = self.code_prob[state].copy()
        if previous_visit:
            idx = np.array(sorted({self._index[c] for c in previous_visit if c in self._index}), dtype=np.int64)
            if idx.size:
                p[idx] = 1.0 - (1.0 - p[idx]) * (1.0 - self.persistence[idx])
        return p * self.allowed_mask(age, sex)

    def _visit_indices(self, visit) -> np.ndarray | None:
        """Sorted distinct vocabulary indices of `visit`, or None if a code is outside the vocabulary."""
        idx = set()
        for c in visit:
            i = self._index.get(c)
            if i is None:
                return None
            idx.add(i)
        return np.array(sorted(idx), dtype=np.int64)

    def visit_log_prob(self, visit, state: int, age: float, sex: str, previous_visit=None) -> float:
        """log P(the visit's code set | state, age, sex, previous visit, the visit is non-empty).

        `visit` is treated as a set; an empty visit or one holding a code outside the vocabulary or
        forbidden for this age/sex has probability 0 (returns -inf)."""
        p = self.code_probs(state, age, sex, previous_visit)
        idx = self._visit_indices(visit)
        if idx is None or idx.size == 0 or not np.all(p[idx] > 0):
            return float("-inf")
        with np.errstate(divide="ignore"):
            log1m = np.log1p(-p)
            total = log1m.sum()
            log_nonempty = np.log(-np.expm1(total))
            return float(total + np.sum(np.log(p[idx]) - log1m[idx]) - log_nonempty)

    def _emission_tables(self, age: float, sex: str):
        """Per demographic key: masked (S, C) probabilities, log p, log(1-p) and their row sums."""
        key = self._demo_key(age, sex)
        cached = self._emission_cache.get(key)
        if cached is None:
            P = self.code_prob * self._key_mask(key)[None, :]
            with np.errstate(divide="ignore"):
                logp = np.log(P)
            log1m = np.log1p(-P)
            cached = (P, logp, log1m, log1m.sum(1))
            self._emission_cache[key] = cached
        return cached

    def _visit_loglik_states(self, visit_idx, prev_idx, age: float, sex: str) -> np.ndarray:
        """(S,) log P(visit | z = s, ...) for every state at once (same value as `visit_log_prob`).

        Only the columns of the visit and of the previous visit's chronic codes differ from the
        cached per-demographic tables, so the cost is O(S * (|visit| + |previous|))."""
        if visit_idx is None or visit_idx.size == 0:
            return np.full(self.n_states, -np.inf)
        P, logp, log1m, total = self._emission_tables(age, sex)
        logp_v = logp[:, visit_idx]
        log1m_v = log1m[:, visit_idx]
        if prev_idx is not None and prev_idx.size:
            rho = self.persistence[prev_idx]
            prev_idx = prev_idx[rho > 0]
            rho = rho[rho > 0]
        if prev_idx is not None and prev_idx.size:
            mask = self.allowed_mask(age, sex)[prev_idx]
            boosted = (1.0 - (1.0 - P[:, prev_idx]) * (1.0 - rho)[None, :]) * mask[None, :]
            with np.errstate(divide="ignore"):
                log1m_b = np.log1p(-boosted)
            total = total - log1m[:, prev_idx].sum(1) + log1m_b.sum(1)
            pos = np.searchsorted(prev_idx, visit_idx)
            pos = np.minimum(pos, prev_idx.size - 1)
            hit = prev_idx[pos] == visit_idx
            if hit.any():
                with np.errstate(divide="ignore"):
                    logp_v = logp_v.copy()
                    log1m_v = log1m_v.copy()
                    logp_v[:, hit] = np.log(boosted[:, pos[hit]])
                    log1m_v[:, hit] = log1m_b[:, pos[hit]]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_nonempty = np.log(-np.expm1(total))
            ll = total + (logp_v - log1m_v).sum(1) - log_nonempty
        return np.where(np.isnan(ll), -np.inf, ll)

    # -- exact next-visit probabilities (forward algorithm) -----------------------------------

    def _forward(self, patient: Patient, n: int):
        """Yield, for k = 0 .. n-1: (log prior over z_k given visits[:k] and that visit k exists,
        log-likelihood vector of visits[k] per state, predictive log prob of visits[k])."""
        if n > self.max_visits:
            raise ValueError(f"the model never makes more than max_visits={self.max_visits} visits")
        age, sex = patient.age, patient.sex
        with np.errstate(divide="ignore"):
            log_pi = np.log(self.initial_state_probs(age, sex))
            logT = np.log(self.transition_matrix(age, sex))
            log_q = np.log(self.continue_prob)
        log_post = None
        prev_idx = None
        for k in range(n):
            if k == 0:
                log_prior = log_pi
            else:
                w = log_post + log_q                      # P(z_{k-1}, visit k exists | history)
                log_prior = _logsumexp(w[:, None] + logT, axis=0) - _logsumexp(w)
            idx = self._visit_indices(patient.visits[k])
            ll = self._visit_loglik_states(idx, prev_idx, age, sex)
            joint = log_prior + ll
            out = float(_logsumexp(joint))
            yield log_prior, ll, out
            with np.errstate(invalid="ignore"):
                log_post = joint - out                    # P(z_k | visits[:k+1]); nan after an impossible visit
            prev_idx = idx

    def next_visit_log_probs(self, patient: Patient) -> np.ndarray:
        """(n_visits,) entry k = `next_visit_log_prob(patient, k)`, all in one forward pass."""
        return np.array([out for _, _, out in self._forward(patient, len(patient.visits))])

    def next_visit_log_prob(self, patient: Patient, k: int) -> float:
        """Exact log P(visits[k] | visits[:k], age, sex, visit k exists) under the model.

        The forward algorithm sums over the hidden states of visits 0..k. It conditions on
        everything observed up to visit k and on nothing later: the demographics, the code sets of
        visits 0..k-1, the fact that visits 1..k exist (each existence has probability
        continue_prob[z_{j-1}], which carries information about the states), the persistence of
        chronic codes from visits[k-1], the non-empty conditioning of every visit and the age/sex
        code rules. It does NOT condition on how many visits follow k. k = 0 gives the first
        visit's probability given the demographics. Returns -inf for a visit the model cannot make
        (empty, a code outside `codes`, a code forbidden for the age/sex) and nan when an earlier
        visit is already impossible.
        """
        if not 0 <= k < len(patient.visits):
            raise IndexError(f"visit {k} out of range for a patient with {len(patient.visits)} visits")
        out = float("nan")
        for _, _, out in self._forward(patient, k + 1):
            pass
        return out

    def next_visit_exists_prob(self, patient: Patient, k: int) -> float:
        """P(visit k exists | visits[:k], age, sex) for k >= 1: the chance the patient comes back
        after visits[:k] (0 when k >= max_visits)."""
        if not 1 <= k <= len(patient.visits):
            raise IndexError(f"visit {k} out of range: need 1 <= k <= {len(patient.visits)}")
        if k >= self.max_visits:
            return 0.0
        log_post = None
        for log_prior, ll, out in self._forward(patient, k):
            log_post = log_prior + ll - out
        return float(np.exp(log_post) @ self.continue_prob)

    def next_visit_state_probs(self, patient: Patient, k: int) -> np.ndarray:
        """(S,) P(z_k | visits[:k], age, sex, visit k exists): the predictive state distribution."""
        if not 0 <= k <= len(patient.visits):
            raise IndexError(f"visit {k} out of range")
        history = Patient(patient.subject_id, patient.age, patient.sex,
                          list(patient.visits[:k]) + [[self.codes[0]]])
        log_prior = None
        for log_prior, _, _ in self._forward(history, k + 1):
            pass
        return np.exp(log_prior)

    def next_visit_code_marginals(self, patient: Patient, k: int) -> np.ndarray:
        """(C,) P(code c in visits[k] | visits[:k], age, sex, visit k exists): the Bayes-optimal
        per-code probabilities (visits[k] itself need not exist: k may equal len(visits))."""
        w = self.next_visit_state_probs(patient, k)
        prev = patient.visits[k - 1] if k >= 1 else None
        out = np.zeros(self.n_codes)
        for s in np.flatnonzero(w > 0):
            p = self.code_probs(int(s), patient.age, patient.sex, prev)
            nonempty = -np.expm1(np.log1p(-p).sum())
            out += w[s] * p / nonempty
        return out

    # -- sampling -----------------------------------------------------------------------------

    def sample_demographics(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(ages (n,), male (n,) bool) drawn from the model's demographic distribution."""
        neo = rng.random(n) < self.neonate_share
        male = rng.random(n) < np.where(neo, self.neonate_male_share, self.adult_male_share)
        top = rng.random(n) < self.age_top_share
        body = self.age_min_adult + (self.age_top - self.age_min_adult) * rng.beta(self.age_beta_a, self.age_beta_b, n)
        age = np.where(neo, 0.0, np.where(top, self.age_top, np.round(body, 1)))
        return np.minimum(age, self.age_top), male

    def _sample_categorical(self, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One draw per row of non-negative (n, K) weights (rows need not be normalised)."""
        cdf = np.cumsum(weights, axis=1)
        u = (1.0 - rng.random(weights.shape[0])) * cdf[:, -1]      # in (0, total]
        return np.minimum((cdf < u[:, None]).sum(1), weights.shape[1] - 1)

    def sample(self, n_patients: int, seed: int) -> list[Patient]:
        """Draw `n_patients` patients (vectorised over patients); the same seed gives the same cohort."""
        return self.sample_with_states(n_patients, seed)[0]

    def sample_with_states(self, n_patients: int, seed: int) -> tuple[list[Patient], list[list[int]]]:
        """`sample`, plus the hidden state index of every visit of every patient (same draws: the
        patients equal `sample(n_patients, seed)`)."""
        if n_patients < 0:
            raise ValueError("n_patients must be >= 0")
        rng = np.random.default_rng(seed)
        n, S, C = n_patients, self.n_states, self.n_codes
        age, male = self.sample_demographics(n, rng)
        sex = np.where(male, "M", "F")
        female = ~male

        # per-patient eligibility of states, and the demographic key of the code rules
        sex_ok = np.array([[s is None or (s == "M") == m for s in self.state_sex] for m in (False, True)])
        eligible = (self.state_min_age[None, :] <= age[:, None]) & (age[:, None] < self.state_max_age[None, :])
        eligible &= sex_ok[male.astype(int)]
        key = (female.astype(int) * 4 + (age < NEWBORN_AGE_LIMIT) * 2
               + ((age >= PREGNANCY_AGE_RANGE[0]) & (age <= PREGNANCY_AGE_RANGE[1])))
        masks = np.stack([self._key_mask((bool(g & 4), bool(g & 2), bool(g & 1))) for g in range(8)])

        # first-visit states
        logits = self.init_logit[None, :] + self.init_logit_age[None, :] * (age[:, None] - 60.0) / 10.0
        logits = logits + self.init_logit_male[None, :] * male[:, None]
        logits = np.where(eligible, logits, -np.inf)
        if n and not eligible.any(1).all():
            raise ValueError("a sampled patient has no eligible state")
        w = np.exp(logits - logits.max(1, keepdims=True)) if n else np.zeros((0, S))
        z = self._sample_categorical(w, rng)

        codes_arr = np.array(self.codes, dtype=object)
        chronic = self.persistence > 0
        visits: list[list[list[str]]] = [[] for _ in range(n)]
        states: list[list[int]] = [[] for _ in range(n)]
        active = np.arange(n)
        prev = None
        block = 8192
        for j in range(self.max_visits):
            if active.size == 0:
                break
            cur = np.zeros((active.size, C), dtype=bool)
            for s in range(S):
                rows_s = np.flatnonzero(z == s)
                for b in range(0, rows_s.size, block):
                    rows = rows_s[b:b + block]
                    p = np.broadcast_to(self.code_prob[s], (rows.size, C))
                    if prev is not None:
                        boost = prev[rows] & chronic[None, :]
                        p = np.where(boost, 1.0 - (1.0 - p) * (1.0 - self.persistence[None, :]), p)
                    p = p * masks[key[active[rows]]]
                    if not (p > 0).any(1).all():
                        raise ValueError(f"state {self.state_names[s]} cannot make a non-empty visit for some patient")
                    v = rng.random((rows.size, C)) < p
                    empty = np.flatnonzero(~v.any(1))
                    while empty.size:                      # condition on a non-empty visit
                        v[empty] = rng.random((empty.size, C)) < p[empty]
                        empty = empty[~v[empty].any(1)]
                    cur[rows] = v
            # emit the code strings, in random order inside each visit
            r, c = np.nonzero(cur)
            order = np.lexsort((rng.random(r.size), r))
            names = codes_arr[c[order]].tolist()
            ends = np.cumsum(cur.sum(1)).tolist()
            start = 0
            for i, end, state in zip(active.tolist(), ends, z.tolist()):
                visits[i].append(names[start:end])
                states[i].append(state)
                start = end
            # does another visit follow, and in which state
            if j + 1 >= self.max_visits:
                break
            cont = rng.random(active.size) < self.continue_prob[z]
            active, z, prev = active[cont], z[cont], cur[cont]
            if active.size:
                T = self.transition[z] * eligible[active]
                if not (T.sum(1) > 0).all():
                    raise ValueError("a state transitions only to states the patient is not eligible for")
                z = self._sample_categorical(T, rng)

        patients = [Patient(f"S{i + 1:07d}", float(age[i]), str(sex[i]), visits[i]) for i in range(n)]
        return patients, states


# ----------------------------------------------------------------------------------------------
# The default model
# ----------------------------------------------------------------------------------------------

def default_cohort_model() -> CohortModel:
    """The built-in MIMIC-like cohort model (a fresh object on every call)."""
    state_tables = {s: parse_code_table(STATE_CODE_TABLES[s]) for s in STATE_NAMES}
    shared = parse_code_table(SHARED_TAIL_TABLE)
    codes: list[str] = []
    seen = set()
    for table in list(state_tables.values()) + [shared]:
        for code in table:
            if code not in seen:
                seen.add(code)
                codes.append(code)
    index = {c: i for i, c in enumerate(codes)}
    S, C = len(STATE_NAMES), len(codes)
    shared_vec = np.zeros(C)
    for code, p in shared.items():
        shared_vec[index[code]] = p
    code_prob = np.zeros((S, C))
    for s, name in enumerate(STATE_NAMES):
        own = np.zeros(C)
        for code, p in state_tables[name].items():
            own[index[code]] = p
        scale = STATE_PARAMS[name][7]
        code_prob[s] = 1.0 - (1.0 - own) * (1.0 - scale * shared_vec)
    persistence = np.zeros(C)
    for rho, text in CHRONIC_CODES.items():
        for code in text.split():
            if code not in index:
                raise ValueError(f"chronic code {code} is not in the vocabulary")
            persistence[index[code]] = max(persistence[index[code]], rho)
    params = [STATE_PARAMS[name] for name in STATE_NAMES]
    return CohortModel(
        codes=codes,
        state_names=list(STATE_NAMES),
        init_logit=np.array([p[0] for p in params]),
        init_logit_age=np.array([p[1] for p in params]),
        init_logit_male=np.array([p[2] for p in params]),
        state_min_age=np.array([p[3] for p in params]),
        state_max_age=np.array([p[4] for p in params]),
        state_sex=[p[5] for p in params],
        transition=TRANSITION.copy(),
        code_prob=code_prob,
        persistence=persistence,
        continue_prob=np.array([p[6] for p in params]),
        max_visits=DEFAULT_MAX_VISITS,
    )


def sample_cohort(n_patients: int, seed: int = 0) -> list[Patient]:
    """`n_patients` synthetic patients from the default model (same seed -> same cohort)."""
    return default_cohort_model().sample(n_patients, seed)
